"""A stand-in generator that writes statements instantly, for the load benchmark ONLY.

bench/load.py measures the web tier (daphne, the channel layer, PostgreSQL, the
consumers) with hundreds of rooms at once. A real model would make the benchmark
measure the GPU queue instead, so its arm sets ``generator_backend="stand-in"``
and this backend answers in microseconds.

It is never a default: settings.CONCORD_GENERATOR_BACKEND does not accept it, so
only an arm that names it explicitly gets it. Its statements are stitched together
from the opinions; they are not mediation and must never be shown to people.

It still honours the whole Generator contract, so everything downstream (reward
model, welfare ranking, candidate storage, presentation) runs exactly as it does
with a real model: exactly n candidates, each with its own opinion order (the same
seeded shuffle the real backends use), the prompt it would have sent, token counts,
a latency, and a seed; the same request always gives the same candidates.
"""

from __future__ import annotations

import re
import time

from .base import Candidate, GenerationError, GenerationRequest, ProgressCallback
from .prompts import build_messages, opinion_order

BACKEND_NAME = "stand-in"
DEFAULT_MODEL_ID = "stand-in-v1"
# Bumped whenever the stitching below changes, so stored candidates say which version wrote them.
REVISION = "stand-in-1"
# Short statements keep the reward model (which embeds every statement) cheap in the load benchmark.
_WORDS_PER_OPINION = 8
_FIRST_SENTENCE_RE = re.compile(r"^(.+?[.!?])(?:\s|$)", re.DOTALL)

# Several openings, so the n candidates of one request differ in wording as well as in order.
_OPENINGS = (
    "We agree that",
    "Most of us think that",
    "Our group holds that",
    "Taken together, we believe that",
    "On balance, we find that",
)


def _gist(opinion: str) -> str:
    """The first sentence of an opinion, at most a few words, without its final punctuation."""
    text = " ".join(opinion.split())
    match = _FIRST_SENTENCE_RE.match(text)
    sentence = match.group(1) if match else text
    words = sentence.rstrip(".!?").split()
    return " ".join(words[:_WORDS_PER_OPINION])


def _render_prompt(messages: list[dict[str, str]]) -> str:
    # No tokenizer: a plain transcript of the chat a real backend would have rendered.
    return "\n\n".join(f"[{message['role']}]\n{message['content']}" for message in messages)


class StandInGenerator:
    """Deterministic, model-free Generator for isolating the web tier in bench/load.py."""

    backend = BACKEND_NAME

    def __init__(self, model: str = "", **_ignored: object) -> None:
        # The registry passes device/cache_dir to every backend; the stand-in has no weights to place.
        self.model_id = model or DEFAULT_MODEL_ID
        self.model_revision = REVISION

    def generate(self, request: GenerationRequest, *, on_progress: ProgressCallback | None = None) -> list[Candidate]:
        if request.n < 1:
            raise GenerationError(f"n must be at least 1, got {request.n}")
        if not request.opinions:
            raise GenerationError("a generation request needs at least one opinion")
        candidates: list[Candidate] = []
        for sample_index in range(request.n):
            started = time.perf_counter()
            order = opinion_order(request.seed, sample_index, len(request.opinions))
            prompt = _render_prompt(build_messages(request.question, request.opinions, order))
            opening = _OPENINGS[sample_index % len(_OPENINGS)]
            clauses = [_gist(request.opinions[index]) for index in order]
            text = (
                f"{opening} {clauses[0].rstrip(',;:')}."
                + "".join(f" Some of us add: {clause.rstrip(',;:')}." for clause in clauses[1:])
                + f" (Draft {sample_index + 1}.)"
            )
            candidates.append(
                Candidate(
                    text=text,
                    backend=self.backend,
                    model_id=self.model_id,
                    model_revision=self.model_revision,
                    prompt=prompt,
                    opinion_order=order,
                    seed=request.seed,
                    prompt_tokens=len(prompt.split()),
                    completion_tokens=len(text.split()),
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                    # Deterministic text: nothing is sampled, so there is no sampling seed.
                    sample_index=sample_index,
                )
            )
            if on_progress is not None:
                on_progress(sample_index + 1, request.n)
        return candidates
