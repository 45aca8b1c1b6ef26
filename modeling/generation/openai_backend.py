"""Generation through any OpenAI-compatible server (vLLM serve, TGI, llama.cpp, hosted APIs).

Request shape: every sample has its own opinion order, hence its own prompt. Samples
that happen to share an order (always the case with one opinion, often with two or
three) are grouped into one /v1/chat/completions request with ``n`` equal to the group
size; every other sample is its own request with n=1. The requests are sent
concurrently (bounded by max_concurrency) so a batching server such as vLLM still
batches them, and its prefix cache shares the common start of the prompts.

Token accounting: ``usage`` is per request. With n=1 it is exact; for a grouped
request the prompt tokens are exact and the completion tokens are split across the
choices in proportion to their text length (servers do not report per-choice usage).

Only the standard library is used (urllib), so this backend adds no dependency.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Candidate, GenerationError, GenerationRequest, ProgressCallback, SamplingParams
from .cleaning import (
    DEFAULT_CLEANING,
    CleaningOptions,
    ProgressReporter,
    RawSample,
    build_candidates,
    collect_statements,
)
from .prompts import INSTRUCTION_TEXTS, ChatMessage, PromptPlan, derive_seed, plan_prompts

logger = logging.getLogger(__name__)

# 408 Request Timeout and 429 Too Many Requests are transient despite being 4xx.
_RETRYABLE_4XX = {408, 409, 429}
_MAX_RETRY_AFTER_S = 30.0


class TransientServerError(Exception):
    """A failure that a later attempt may not repeat: 5xx, 429, timeout, refused connection."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        # Seconds the server asked us to wait (Retry-After), if it said.
        self.retry_after = retry_after


@dataclass
class ChatChoice:
    text: str
    finish_reason: str | None


@dataclass
class ChatResponse:
    choices: list[ChatChoice]
    prompt_tokens: int
    completion_tokens: int
    model: str
    system_fingerprint: str | None
    latency_ms: float


def chat_completions_url(base_url: str) -> str:
    """Accept "http://host:8000", ".../v1" or the full endpoint URL."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    if not url.endswith("/v1"):
        url += "/v1"
    return url + "/chat/completions"


class OpenAIGenerator:
    backend = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key: str = "",
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_concurrency: int = 8,
        cleaning: CleaningOptions = DEFAULT_CLEANING,
        device: str = "auto",  # accepted for registry symmetry; the server owns the device
        cache_dir: Path | None = None,  # likewise unused: no weights are loaded here
    ) -> None:
        if not base_url:
            raise GenerationError("The openai backend needs a base URL (CONCORD_OPENAI_BASE_URL).")
        if not model:
            raise GenerationError("The openai backend needs the server's model name.")
        self.model_id = model
        # What the server is actually running is only known from its responses (model +
        # system_fingerprint); until the first one, this says so.
        self.model_revision = "unreported"
        self.url = chat_completions_url(base_url)
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_concurrency = max(1, max_concurrency)
        self.cleaning = cleaning
        self._revision_lock = threading.Lock()

    # --- the Generator protocol -------------------------------------------------

    def generate(self, request: GenerationRequest, *, on_progress: ProgressCallback | None = None) -> list[Candidate]:
        if request.n < 1:
            raise GenerationError(f"n must be at least 1, got {request.n}")
        if not request.opinions:
            raise GenerationError("a generation request needs at least one opinion")
        progress = ProgressReporter(request.n, on_progress)
        progress.update(0)
        accepted = 0

        def note_accepted(count: int) -> None:
            nonlocal accepted
            accepted = count
            progress.update(count)

        def sampler(indices: Sequence[int]) -> list[RawSample]:
            plans = plan_prompts(request.question, request.opinions, request.seed, indices)
            return self._sample_plans(plans, request, lambda finished: progress.update(accepted + finished))

        samples = collect_statements(
            sampler, request.n, options=self.cleaning, on_accepted=note_accepted, instructions=INSTRUCTION_TEXTS
        )
        progress.finish()
        return build_candidates(
            samples, backend=self.backend, model_id=self.model_id, model_revision=self.model_revision, seed=request.seed
        )

    # --- HTTP ---------------------------------------------------------------------

    def chat(self, messages: list[ChatMessage], *, n: int, sampling: SamplingParams, seed: int) -> ChatResponse:
        """One chat completion request, retried on transient failures."""
        body = {
            "model": self.model_id,
            "messages": messages,
            "n": n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "seed": seed,
        }
        payload = json.dumps(body).encode()
        last_error: Exception | None = None
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(payload)
            except TransientServerError as error:
                last_error = error
                if attempt == self.max_retries:
                    break
                delay = error.retry_after or self.backoff_s * (2**attempt)
                # Jitter keeps concurrent requests from retrying in lockstep.
                delay = min(delay, _MAX_RETRY_AFTER_S) * (1.0 + 0.25 * random.random())
                logger.warning("%s (attempt %d of %d); retrying in %.2fs.", error, attempt + 1, self.max_retries + 1, delay)
                time.sleep(delay)
        raise GenerationError(
            f"OpenAI-compatible server at {self.url} failed after {self.max_retries + 1} attempts: {last_error}"
        )

    def _post(self, payload: bytes) -> ChatResponse:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        http_request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(http_request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = _error_detail(error)
            if error.code >= 500 or error.code in _RETRYABLE_4XX:
                raise TransientServerError(
                    f"HTTP {error.code} from {self.url}: {detail}", retry_after=_retry_after_seconds(error)
                ) from error
            raise GenerationError(f"HTTP {error.code} from {self.url}: {detail}") from error
        except TimeoutError as error:
            raise TransientServerError(f"no response from {self.url} within {self.timeout_s}s") from error
        except urllib.error.URLError as error:
            if isinstance(error.reason, (TimeoutError, socket.timeout)):
                raise TransientServerError(f"no response from {self.url} within {self.timeout_s}s") from error
            raise TransientServerError(f"cannot reach {self.url}: {error.reason}") from error
        except (ConnectionError, OSError, http.client.HTTPException) as error:
            raise TransientServerError(f"connection to {self.url} failed: {error}") from error
        latency_ms = (time.perf_counter() - started) * 1000.0
        return _parse_chat_response(raw, self.url, latency_ms)

    # --- internals ----------------------------------------------------------------

    def _sample_plans(self, plans: list[PromptPlan], request: GenerationRequest, on_finished: Any) -> list[RawSample]:
        # Group samples whose prompts are identical (same opinion order) into one request.
        groups: dict[tuple[int, ...], list[PromptPlan]] = {}
        for plan in plans:
            groups.setdefault(tuple(plan.opinion_order), []).append(plan)
        results: list[RawSample] = []
        finished = 0
        # Seeded by the group's first sample index, so every request differs and is reproducible
        # on servers that honour `seed`.
        seeds = {key: derive_seed("openai", request.seed, members[0].sample_index) % (2**31) for key, members in groups.items()}
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(groups))) as pool:
            futures = {
                pool.submit(self.chat, members[0].messages, n=len(members), sampling=request.sampling, seed=seeds[key]): key
                for key, members in groups.items()
            }
            for future in as_completed(futures):
                key = futures[future]
                members = groups[key]
                response = future.result()  # GenerationError propagates: the server is unusable
                results.extend(self._to_samples(members, response, seed=seeds[key]))
                finished += len(members)
                on_finished(finished)
        return results

    def _to_samples(self, members: list[PromptPlan], response: ChatResponse, *, seed: int | None = None) -> list[RawSample]:
        revision = response.model + (f"@{response.system_fingerprint}" if response.system_fingerprint else "")
        with self._revision_lock:
            self.model_revision = revision
        prompt = json.dumps(members[0].messages, ensure_ascii=False)
        total_chars = sum(len(choice.text) for choice in response.choices) or 1
        samples = []
        for position, plan in enumerate(members):
            if position >= len(response.choices):
                # Some servers (llama.cpp) ignore n > 1; the missing samples are resampled.
                samples.append(
                    RawSample("", plan.sample_index, prompt, plan.opinion_order, response.prompt_tokens, 0,
                              response.latency_ms, False, error="server returned fewer choices than requested",
                              model_revision=revision, sampling_seed=seed)
                )
                continue
            choice = response.choices[position]
            if len(response.choices) == 1:
                completion_tokens = response.completion_tokens
            else:
                completion_tokens = round(response.completion_tokens * len(choice.text) / total_chars)
            samples.append(
                RawSample(
                    text=choice.text,
                    sample_index=plan.sample_index,
                    prompt=prompt,
                    opinion_order=plan.opinion_order,
                    prompt_tokens=response.prompt_tokens,
                    completion_tokens=completion_tokens,
                    latency_ms=response.latency_ms,
                    hit_token_limit=choice.finish_reason == "length",
                    model_revision=revision,
                    sampling_seed=seed,
                )
            )
        return samples


def _error_detail(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read().decode("utf-8", "replace")
    except OSError:
        return error.reason or ""
    try:
        parsed = json.loads(body)
        message = parsed.get("error", parsed)
        if isinstance(message, dict):
            message = message.get("message", message)
        return str(message)[:500]
    except ValueError:
        return body[:500]


def _retry_after_seconds(error: urllib.error.HTTPError) -> float | None:
    value = error.headers.get("Retry-After") if error.headers else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _parse_chat_response(raw: bytes, url: str, latency_ms: float) -> ChatResponse:
    try:
        data = json.loads(raw)
        choices = sorted(data["choices"], key=lambda choice: choice.get("index", 0))
        parsed = [
            ChatChoice(text=(choice.get("message") or {}).get("content") or "", finish_reason=choice.get("finish_reason"))
            for choice in choices
        ]
        usage = data.get("usage") or {}
        return ChatResponse(
            choices=parsed,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            model=str(data.get("model", "unknown")),
            system_fingerprint=data.get("system_fingerprint"),
            latency_ms=latency_ms,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise GenerationError(f"{url} did not return a chat completion: {raw[:300]!r}") from error
