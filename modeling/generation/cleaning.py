"""Turning raw model output into candidate statements, and collecting exactly n distinct ones.

Every backend samples through `collect_statements`: it asks the backend's sampler for
a round of raw completions, cleans each one, rejects empty or near-duplicate
statements, and asks again for the shortfall, a bounded number of times. Small models
often produce the same sentence twice or nothing at all, and the welfare ranking is
only meaningful over distinct candidates.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .base import Candidate, GenerationError, ProgressCallback

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHARS = 1200
DEFAULT_MIN_WORDS = 3
DEFAULT_SIMILARITY_THRESHOLD = 0.9
DEFAULT_MAX_EXTRA_ROUNDS = 2

# Special tokens of common chat templates, and the bare role names they introduce.
_ROLE_TOKEN_RE = re.compile(
    r"<\|[^<>|\n]{1,64}\|>|</?(?:start_of_turn|end_of_turn|s)>|\[/?INST\]|<</?SYS>>", re.IGNORECASE
)
_LEADING_ROLE_NAME_RE = re.compile(r"^\s*(?:system|user|assistant|model)\s*\n", re.IGNORECASE)
# Labels a model puts in front of its answer: "Assistant:", "**Consensus statement:**", ...
_LEADING_LABEL_RE = re.compile(
    r"^\s*(?:[#>*_\s]*)"
    r"(?:assistant|mediator|ai|answer|response|output|"
    r"(?:(?:draft|final|proposed|revised|group|our|the)\s+)*(?:consensus\s+)?statement|consensus)"
    # A colon, or a dash between spaces (so "AI-driven" is not a label).
    r"\s*(?:\*\*|__)?(?:\s*:|\s+[-–—](?=\s))\s*(?:\*\*|__)?\s*",
    re.IGNORECASE,
)
# The model starting the next turn of a dialogue on its own.
_NEXT_TURN_RE = re.compile(
    r"\n\s*(?:user|human|system|participant\s*\d*|question|opinion\s*\d*)\s*:", re.IGNORECASE
)
_QUOTE_MARKER_RE = re.compile(r"^[ \t]*(?:>[ \t]?)+", re.MULTILINE)
_QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "„": "“"}
_SENTENCE_END_RE = re.compile(r"[.!?…](?:[\"'”’)\]]*)(?=\s|$)")
_WORD_RE = re.compile(r"[\w']+", re.UNICODE)
# Zero-width and bidirectional-override characters: invisible, and a way to smuggle text.
_INVISIBLE_RE = re.compile(r"[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
# Sharing this many consecutive words with our instructions means the model is reciting them.
ECHO_SHINGLE_WORDS = 8


@dataclass
class RawSample:
    """One completion as a backend produced it, before cleaning."""

    text: str
    sample_index: int
    prompt: str
    opinion_order: list[int]
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    # The sample stopped at max_new_tokens rather than at an end-of-turn token.
    hit_token_limit: bool
    # Set when the backend could not produce this sample; the text is then ignored.
    error: str | None = None
    # Overrides the generator's revision when the server reports its own (OpenAI backend).
    model_revision: str | None = None
    # The seed the backend's sampler was given for this sample (None: nothing was sampled). Each
    # backend documents its scope: vllm seeds each sample alone; transformers seeds the torch RNG once
    # per batch, which every row of the batch draws from; openai seeds one request (its n choices).
    sampling_seed: int | None = None


@dataclass
class CleanSample:
    raw: RawSample
    text: str


# Given the sample indices to produce, return one RawSample per index (in any order).
Sampler = Callable[[Sequence[int]], Sequence[RawSample]]


@dataclass(frozen=True)
class CleaningOptions:
    max_chars: int = DEFAULT_MAX_CHARS
    min_words: int = DEFAULT_MIN_WORDS
    similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD
    max_extra_rounds: int = DEFAULT_MAX_EXTRA_ROUNDS


DEFAULT_CLEANING = CleaningOptions()


def _strip_surrounding_quotes(text: str) -> str:
    while len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        inner = text[1:-1].strip()
        # Only unwrap if the quote characters do not also occur inside ("a" and "b").
        if text[0] in inner or text[-1] in inner:
            break
        text = inner
    return text


def _cut_after_last_sentence(text: str, limit: int | None = None) -> str | None:
    """Text up to the end of its last complete sentence (within `limit` chars), or None."""
    window = text if limit is None else text[:limit]
    ends = list(_SENTENCE_END_RE.finditer(window))
    if not ends:
        return None
    return window[: ends[-1].end()].rstrip()


def clean_statement(text: str, *, hit_token_limit: bool = False, max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Strip chat-template debris and labels; drop a cut-off last sentence; bound the length.

    Returns "" when nothing usable is left.
    """
    cleaned = _INVISIBLE_RE.sub("", text.replace("\r\n", "\n"))
    # Leading role tokens (and the role name after them) are debris; the first role token
    # after real text means the model started a new turn, so everything after it goes.
    cleaned = _LEADING_ROLE_NAME_RE.sub("", cleaned.lstrip(), count=1).lstrip()
    while match := _ROLE_TOKEN_RE.match(cleaned):
        cleaned = _LEADING_ROLE_NAME_RE.sub("", cleaned[match.end() :].lstrip(" "), count=1).lstrip()
    next_token = _ROLE_TOKEN_RE.search(cleaned)
    if next_token:
        cleaned = cleaned[: next_token.start()]
    next_turn = _NEXT_TURN_RE.search(cleaned)
    if next_turn:
        cleaned = cleaned[: next_turn.start()]

    previous = None
    while previous != cleaned:
        previous = cleaned
        cleaned = _LEADING_LABEL_RE.sub("", cleaned, count=1).strip()
        cleaned = _strip_surrounding_quotes(cleaned)

    # Our prompt quotes opinions line by line with "> "; a model that copies the style
    # should not leave quote markers in the statement.
    cleaned = _QUOTE_MARKER_RE.sub("", cleaned)
    # One statement, one paragraph: whitespace runs (newlines included) become single spaces.
    cleaned = " ".join(cleaned.split())
    if hit_token_limit:
        complete = _cut_after_last_sentence(cleaned)
        if complete:
            cleaned = complete
    if len(cleaned) > max_chars:
        cleaned = _cut_after_last_sentence(cleaned, max_chars) or (cleaned[:max_chars].rsplit(" ", 1)[0] + "…")
    return _strip_surrounding_quotes(cleaned.strip())


def normalized_words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def similarity(a: str, b: str) -> float:
    """The larger of word-set Jaccard and character-sequence ratio on normalised text.

    Jaccard catches reordered sentences; the sequence ratio catches small edits
    (a changed word in a long statement) that Jaccard over short texts overstates less.
    """
    words_a, words_b = normalized_words(a), normalized_words(b)
    if not words_a or not words_b:
        return 1.0 if words_a == words_b else 0.0
    set_a, set_b = set(words_a), set(words_b)
    jaccard = len(set_a & set_b) / len(set_a | set_b)
    matcher = difflib.SequenceMatcher(None, " ".join(words_a), " ".join(words_b), autojunk=False)
    # quick_ratio is an upper bound on ratio; skip the quadratic part when it cannot matter.
    ratio = matcher.ratio() if matcher.quick_ratio() > jaccard else 0.0
    return max(jaccard, ratio)


def is_near_duplicate(text: str, others: Sequence[str], threshold: float = DEFAULT_SIMILARITY_THRESHOLD) -> bool:
    return any(similarity(text, other) >= threshold for other in others)


def is_usable(text: str, min_words: int = DEFAULT_MIN_WORDS) -> bool:
    return len(normalized_words(text)) >= min_words


def _shingles(words: Sequence[str], size: int) -> set[tuple[str, ...]]:
    return {tuple(words[start : start + size]) for start in range(len(words) - size + 1)}


def echoes_instructions(text: str, instructions: Sequence[str], shingle_words: int = ECHO_SHINGLE_WORDS) -> bool:
    """True if the text recites a run of `shingle_words` words of our own instructions.

    Small models often answer by repeating the system prompt; such a "statement" says
    nothing about the group. Quoting the participants is fine: only instructions count.
    """
    text_shingles = _shingles(normalized_words(text), shingle_words)
    return any(text_shingles & _shingles(normalized_words(source), shingle_words) for source in instructions)


@dataclass
class _Pool:
    accepted: list[CleanSample] = field(default_factory=list)
    # Usable but too similar to an accepted statement; the fallback when rounds run out.
    duplicates: list[CleanSample] = field(default_factory=list)
    rejected_empty: int = 0
    echoes: int = 0
    failed: int = 0


def collect_statements(
    sampler: Sampler,
    n: int,
    *,
    options: CleaningOptions = DEFAULT_CLEANING,
    on_accepted: Callable[[int], None] | None = None,
    instructions: Sequence[str] = (),
) -> list[CleanSample]:
    """Exactly n cleaned statements, resampling empty, failed and near-duplicate ones.

    Round 0 samples indices 0..n-1; each extra round samples only the shortfall, with
    fresh indices (so fresh opinion orders and seeds). After `max_extra_rounds` extra
    rounds the gap is filled with the most distinct of the near-duplicates, and, if
    there are too few of those, with repeats of accepted statements: the interface
    promises exactly n. With no usable statement at all, GenerationError.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    pool = _Pool()
    next_index = 0
    for round_number in range(options.max_extra_rounds + 1):
        wanted = n - len(pool.accepted)
        if wanted <= 0:
            break
        indices = list(range(next_index, next_index + wanted))
        next_index += wanted
        samples = sampler(indices)
        for raw in sorted(samples, key=lambda sample: sample.sample_index):
            if raw.error is not None:
                pool.failed += 1
                continue
            text = clean_statement(raw.text, hit_token_limit=raw.hit_token_limit, max_chars=options.max_chars)
            if not is_usable(text, options.min_words):
                pool.rejected_empty += 1
                continue
            if instructions and echoes_instructions(text, instructions):
                pool.echoes += 1
                continue
            candidate = CleanSample(raw=raw, text=text)
            if len(pool.accepted) >= n:
                pool.duplicates.append(candidate)  # a surplus sample is still a fallback
            elif is_near_duplicate(text, [kept.text for kept in pool.accepted], options.similarity_threshold):
                pool.duplicates.append(candidate)
            else:
                pool.accepted.append(candidate)
        if on_accepted is not None:
            on_accepted(min(len(pool.accepted), n))
        if len(pool.accepted) < n:
            logger.info(
                "Round %d left %d of %d statements missing (so far %d empty, %d echoing the instructions, "
                "%d failed, %d near-duplicates).",
                round_number, n - len(pool.accepted), n, pool.rejected_empty, pool.echoes, pool.failed,
                len(pool.duplicates),
            )

    if not pool.accepted:
        raise GenerationError(
            f"No usable statement after {options.max_extra_rounds + 1} rounds "
            f"({pool.rejected_empty} empty, {pool.echoes} echoing the instructions, {pool.failed} failed samples)."
        )
    if len(pool.accepted) < n:
        logger.warning(
            "Only %d distinct statements of %d requested; filling the rest with the most distinct leftovers.",
            len(pool.accepted), n,
        )
        _fill_from_leftovers(pool, n)
    return pool.accepted[:n]


def _fill_from_leftovers(pool: _Pool, n: int) -> None:
    leftovers = list(pool.duplicates)
    while len(pool.accepted) < n and leftovers:
        kept_texts = [kept.text for kept in pool.accepted]
        # Greedy: the leftover least similar to anything already kept.
        best = min(leftovers, key=lambda sample: max(similarity(sample.text, kept) for kept in kept_texts))
        leftovers.remove(best)
        pool.accepted.append(best)
    distinct = len(pool.accepted)
    position = 0
    while len(pool.accepted) < n:
        pool.accepted.append(pool.accepted[position % distinct])
        position += 1


def build_candidates(
    samples: Sequence[CleanSample], *, backend: str, model_id: str, model_revision: str, seed: int
) -> list[Candidate]:
    """Candidates with full provenance. `seed` is the request seed: together with the
    request it reproduces the whole set (each sample's own order and sampling seed are
    derived from it and the sample index); each candidate also records its own sample
    index and the seed its sampler was given."""
    return [
        Candidate(
            text=sample.text,
            backend=backend,
            model_id=model_id,
            model_revision=sample.raw.model_revision or model_revision,
            prompt=sample.raw.prompt,
            opinion_order=list(sample.raw.opinion_order),
            seed=seed,
            prompt_tokens=sample.raw.prompt_tokens,
            completion_tokens=sample.raw.completion_tokens,
            latency_ms=sample.raw.latency_ms,
            finish_reason="length" if sample.raw.hit_token_limit else "stop",
            sample_index=sample.raw.sample_index,
            sampling_seed=sample.raw.sampling_seed,
        )
        for sample in samples
    ]


class ProgressReporter:
    """Forwards (done, total) to a ProgressCallback: only on change, never backwards.

    `done` stays below `total` until finish(), because a finished sequence can still
    be rejected as empty or duplicate and resampled; total/total means "ready".
    """

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self._callback = callback
        self._reported = -1

    def update(self, done: int) -> None:
        self._emit(min(done, self.total - 1))

    def finish(self) -> None:
        self._emit(self.total)

    def _emit(self, done: int) -> None:
        if self._callback is not None and done > self._reported:
            self._reported = done
            self._callback(done, self.total)
