"""Under daphne itself, an oversized body is refused while it arrives, not after Twisted took it whole (issue 12).

Twisted reads a whole request body (into a temporary file) before daphne calls the application, and
daphne then queues all of it at once: the review's 148 MB multipart POST peaked a daphne process at
1.4 GB. These tests run a real daphne process and send bodies over a raw socket, so they can see
how much of a body the server took before it answered.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deliberation.processes import ROOT, daphne_command, free_port, wait_until_serving

MB = 1024 * 1024
LIMIT = 1 * MB


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    var_dir = tmp_path_factory.mktemp("daphne-var")
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}}
    # The refusal happens before the application reads anything, so an empty embedded site will do.
    env.update({"DEBUG": "1", "CONCORD_VAR_DIR": str(var_dir), "REQUEST_BODY_MAX_BYTES": str(LIMIT), "PYTHONUNBUFFERED": "1"})
    log = var_dir / "daphne.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(daphne_command(port), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/static/concord/concord.js", process)
        yield port, process
    finally:
        process.terminate()
        process.wait(timeout=20)
        sys.stdout.write(Path(log).read_text(errors="replace")[-3000:])


def _peak_rss_kb(process: subprocess.Popen[bytes]) -> int:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _send(port: int, head: bytes, body_chunks: Iterator[bytes], *, expect_continue: bool = False) -> tuple[bytes, int]:
    """Send `head`, then body chunks until the server answers or closes; (response, body bytes sent).

    With `expect_continue` the client waits for the server's interim or final answer before sending
    any of the body, as an HTTP client that sent `Expect: 100-continue` does (curl waits a second; this
    waits up to 30 s, so a busy machine cannot make the server look slower than the client)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(head)
        response = b""
        if expect_continue:
            response = connection.recv(65536)
            if response.startswith(b"HTTP/1.1 100"):
                response = b""
        connection.setblocking(False)
        for chunk in body_chunks:
            try:
                response += connection.recv(65536)
            except BlockingIOError:
                pass
            if response:
                break
            try:
                connection.setblocking(True)
                connection.settimeout(5)
                connection.sendall(chunk)
                sent += len(chunk)
                connection.setblocking(False)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                break
        connection.setblocking(True)
        connection.settimeout(10)
        try:
            while b"\r\n\r\n" not in response:
                more = connection.recv(65536)
                if not more:
                    break
                response += more
        except (ConnectionResetError, TimeoutError):
            pass
    return response, sent


def _chunks(total: int, size: int = 64 * 1024, *, chunked: bool = False) -> Iterator[bytes]:
    block = b"x" * size
    for _ in range(total // size):
        yield (f"{size:x}\r\n".encode() + block + b"\r\n") if chunked else block


HEAD = (
    "POST /e/demo/join/ HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    "Content-Type: multipart/form-data; boundary=----concord\r\n"
)


def test_a_declared_148_mb_body_is_refused_before_the_client_sends_it(site) -> None:
    port, process = site
    response, sent = _send(
        port, (HEAD + f"Content-Length: {148 * MB}\r\nExpect: 100-continue\r\n\r\n").encode(), _chunks(148 * MB), expect_continue=True
    )
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent == 0  # answered on the headers: not a byte of the body was needed


def test_a_declared_148_mb_body_sent_anyway_is_cut_off(site) -> None:
    port, process = site
    response, sent = _send(port, (HEAD + f"Content-Length: {148 * MB}\r\n\r\n").encode(), _chunks(148 * MB))
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < 32 * MB  # what socket buffers held when the server stopped reading, not the body


def test_a_chunked_148_mb_body_is_cut_off_past_the_limit_and_memory_stays_flat(site) -> None:
    port, process = site
    peak_before = _peak_rss_kb(process)
    response, sent = _send(port, (HEAD + "Transfer-Encoding: chunked\r\n\r\n").encode(), _chunks(148 * MB, chunked=True))
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < 32 * MB
    # The process's peak memory grew by less than the socket buffers' worth: it did not take the body in
    # (it grew by 1.3 GB before: a 1.4 GB peak). Compared with its own earlier peak, because what the
    # process loaded at start-up differs between machines and settings.
    assert _peak_rss_kb(process) - peak_before < 64 * 1024


def test_a_body_under_the_limit_still_reaches_the_application(site) -> None:
    port, _ = site
    body = b"consent=yes"
    head = f"POST /e/demo/join/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n"
    response, _ = _send(port, head.encode(), iter([body]))
    assert response.startswith(b"HTTP/1.1 403")  # Django's CSRF check answered: the body went through
