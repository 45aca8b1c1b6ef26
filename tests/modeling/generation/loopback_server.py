"""A minimal OpenAI-compatible /v1/chat/completions server on 127.0.0.1, backed by a real model.

It renders the request's messages with the model's own chat template and samples
`n` completions with the real TransformersGenerator, so tests of the openai backend
exercise real HTTP and a real model. Faults (5xx, delays, 4xx) can be injected for
the next requests to test retries and timeouts.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from modeling.generation.base import SamplingParams
from modeling.generation.transformers_backend import TransformersGenerator


@dataclass
class Faults:
    """Faults applied to the next requests, one per request, in order."""

    statuses: list[int] = field(default_factory=list)  # answer with this HTTP status instead
    delays_s: list[float] = field(default_factory=list)  # sleep this long before answering


class LoopbackServer:
    def __init__(self, generator: TransformersGenerator, served_model_name: str = "smollm2-loopback") -> None:
        self.generator = generator
        self.served_model_name = served_model_name
        self.faults = Faults()
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        # Not daemon threads: server_close() then waits for in-flight requests, so no request
        # abandoned by a timed-out client is still inside torch when the interpreter exits.
        self._httpd.daemon_threads = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="loopback-openai", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def reset(self) -> None:
        with self._lock:
            self.faults = Faults()
            self.requests.clear()

    def _next_fault(self) -> tuple[int | None, float]:
        with self._lock:
            status = self.faults.statuses.pop(0) if self.faults.statuses else None
            delay = self.faults.delays_s.pop(0) if self.faults.delays_s else 0.0
            return status, delay

    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body["messages"]
        n = int(body.get("n", 1))
        sampling = SamplingParams(
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            max_new_tokens=int(body.get("max_tokens", 64)),
        )
        prompt = self.generator.render_chat(messages)
        completions = self.generator.sample_prompts([prompt] * n, sampling=sampling, seed=int(body.get("seed", 0)))
        return {
            "id": f"chatcmpl-loopback-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.served_model_name,
            "system_fingerprint": f"fp_{self.generator.model_revision[7:19]}",
            "choices": [
                {
                    "index": index,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": "length" if completion.hit_token_limit else "stop",
                }
                for index, completion in enumerate(completions)
            ],
            "usage": {
                "prompt_tokens": completions[0].prompt_tokens,
                "completion_tokens": sum(completion.completion_tokens for completion in completions),
                "total_tokens": completions[0].prompt_tokens + sum(c.completion_tokens for c in completions),
            },
        }

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

            def _reply(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test); nothing to answer

            def do_POST(self) -> None:
                if self.path != "/v1/chat/completions":
                    self._reply(404, {"error": {"message": f"no route {self.path}"}})
                    return
                length = int(self.headers.get("Content-Length", 0))
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError:
                    self._reply(400, {"error": {"message": "body is not JSON"}})
                    return
                with server._lock:
                    server.requests.append(body)
                status, delay = server._next_fault()
                if delay:
                    time.sleep(delay)
                if status is not None:
                    self._reply(status, {"error": {"message": f"injected {status}"}})
                    return
                if body.get("model") != server.served_model_name:
                    self._reply(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                    return
                if not isinstance(body.get("messages"), list) or not body["messages"]:
                    self._reply(400, {"error": {"message": "messages must be a non-empty list"}})
                    return
                self._reply(200, server._complete(body))

        return Handler
