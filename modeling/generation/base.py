"""The generation interface every backend implements."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

# Called as on_progress(done, total) while candidates are being written.
ProgressCallback = Callable[[int, int], None]

# Why sampling of a statement ended: "stop" at an end-of-turn token (or a stop string), "length" at
# max_new_tokens. The same words as the OpenAI API's finish_reason. A "length" statement was cut by the
# token budget; cleaning then keeps only its complete sentences, so the text may still read as whole.
FinishReason = Literal["stop", "length"]
FINISH_REASONS: tuple[FinishReason, ...] = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 120


@dataclass(frozen=True)
class GenerationRequest:
    question: str
    opinions: Sequence[str]
    n: int
    seed: int
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Candidate:
    """One candidate consensus statement and everything needed to reproduce it."""

    text: str
    backend: str
    model_id: str
    # A git revision for hub models, the file's sha256 for single-file weights.
    model_revision: str
    prompt: str
    # Indices into GenerationRequest.opinions, in the order they appeared in the prompt.
    opinion_order: list[int]
    seed: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    finish_reason: FinishReason = "stop"
    # Which sample of the request this is (its opinion order is opinion_order(seed, sample_index, n));
    # rejected samples are replaced by fresh indices, so it can differ from the candidate's position.
    sample_index: int | None = None
    # The seed the backend's sampler was given for this sample (see cleaning.RawSample.sampling_seed).
    sampling_seed: int | None = None


class GenerationError(RuntimeError):
    """Generation failed in a way retrying the same request will not fix."""


class Generator(Protocol):
    backend: str
    model_id: str
    model_revision: str

    def generate(
        self, request: GenerationRequest, *, on_progress: ProgressCallback | None = None
    ) -> list[Candidate]:
        """Return exactly request.n candidates."""
        ...
