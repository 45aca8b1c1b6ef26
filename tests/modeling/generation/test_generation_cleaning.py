"""Cleaning raw completions and collecting exactly n distinct statements."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from modeling.generation.base import GenerationError
from modeling.generation.cleaning import (
    CleaningOptions,
    ProgressReporter,
    RawSample,
    clean_statement,
    collect_statements,
    echoes_instructions,
    is_near_duplicate,
    similarity,
)
from modeling.generation.prompts import INSTRUCTION_TEXTS, SYSTEM_PROMPT


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("<|im_start|>assistant\nWe agree on parks.<|im_end|>", "We agree on parks."),
        ("Assistant: We agree on parks.", "We agree on parks."),
        ("**Consensus statement:** We agree on parks.", "We agree on parks."),
        ("Consensus Statement - We agree on parks.", "We agree on parks."),
        ('"We agree on parks."', "We agree on parks."),
        ("“We agree on parks.”", "We agree on parks."),
        ("We agree on parks.<|im_end|>\n<|im_start|>user\nAnd now?", "We agree on parks."),
        ("We agree on parks.\nUser: thanks!", "We agree on parks."),
        ("  We agree\n\non   parks.  ", "We agree on parks."),
        ("AI-driven parks help us all.", "AI-driven parks help us all."),
        ("> We agree on parks.\n> > And on benches.", "We agree on parks. And on benches."),  # copied quoting
        ("Costs > benefits, we think.", "Costs > benefits, we think."),
        ("\u202aWe agree\u202c on\u200b parks.", "We agree on parks."),  # invisible/bidi characters
        # Quotes that are part of the text are not "surrounding" quotes.
        ('"Green" spaces and "safe" paths.', '"Green" spaces and "safe" paths.'),
    ],
)
def test_template_debris_labels_and_quotes_are_stripped(raw: str, expected: str) -> None:
    assert clean_statement(raw) == expected


def test_cut_off_last_sentence_is_dropped_only_when_the_token_limit_was_hit() -> None:
    raw = "We agree on more trees. We also want safer paths and"
    assert clean_statement(raw, hit_token_limit=True) == "We agree on more trees."
    assert clean_statement(raw, hit_token_limit=False) == raw
    # Nothing complete to fall back to: keep the fragment rather than lose the sample.
    assert clean_statement("We agree on more", hit_token_limit=True) == "We agree on more"


def test_length_is_bounded_at_a_sentence_end() -> None:
    raw = "We agree. " * 50
    cleaned = clean_statement(raw, max_chars=45)
    assert len(cleaned) <= 45 and cleaned.endswith("We agree.")
    unbroken = "word " * 100
    cut = clean_statement(unbroken, max_chars=40)
    assert len(cut) <= 41 and cut.endswith("…")


def test_similarity_catches_reorderings_and_small_edits_but_not_different_texts() -> None:
    a = "We agree that the park needs more trees, safer paths and better lighting for everyone."
    assert similarity(a, a.upper()) == 1.0
    assert is_near_duplicate("We agree that the park needs more trees, safer paths and better lighting for all.", [a])
    assert is_near_duplicate("Safer paths, better lighting for everyone and more trees: we agree the park needs that.", [a])
    assert not is_near_duplicate("We should keep costs low and ask the neighbours first.", [a])


def _sample(index: int, text: str, *, error: str | None = None, hit_limit: bool = False) -> RawSample:
    return RawSample(
        text=text, sample_index=index, prompt=f"prompt {index}", opinion_order=[0], prompt_tokens=10,
        completion_tokens=5, latency_ms=1.0, hit_token_limit=hit_limit, error=error,
    )


class ScriptedSampler:
    """Answers each call with the next scripted round; records which indices were asked for."""

    def __init__(self, rounds: list[list[str | None]]) -> None:
        self.rounds = rounds
        self.requested: list[list[int]] = []

    def __call__(self, indices: Sequence[int]) -> list[RawSample]:
        self.requested.append(list(indices))
        texts = self.rounds[len(self.requested) - 1]
        return [
            _sample(index, text or "", error="boom" if text is None else None) for index, text in zip(indices, texts)
        ]


DISTINCT = [
    "We agree the park needs more trees.",
    "We want the playground repaired before anything else.",
    "Benches and lights would make evenings safer for us.",
    "We should keep spending low this year.",
]


def test_near_duplicates_empty_and_failed_samples_are_resampled_with_fresh_indices() -> None:
    sampler = ScriptedSampler(
        [
            [DISTINCT[0], DISTINCT[0] + " ", "", None],  # one good, one duplicate, one empty, one failed
            [DISTINCT[1], DISTINCT[0].upper(), DISTINCT[2]],
            [DISTINCT[3]],
        ]
    )
    statements = collect_statements(sampler, 4)
    assert [statement.text for statement in statements] == DISTINCT[:1] + DISTINCT[1:3] + DISTINCT[3:]
    assert sampler.requested == [[0, 1, 2, 3], [4, 5, 6], [7]]


def test_rounds_are_bounded_and_the_gap_is_filled_with_the_most_distinct_leftovers() -> None:
    near = "We agree the park needs more trees now."
    sampler = ScriptedSampler([[DISTINCT[0], DISTINCT[0], near], [DISTINCT[0]], [DISTINCT[0]]])
    statements = collect_statements(sampler, 3, options=CleaningOptions(max_extra_rounds=2))
    assert len(sampler.requested) == 3  # the first round and two extra ones, no more
    assert len(statements) == 3
    assert statements[0].text == DISTINCT[0]
    # The leftover that differs most from what was kept comes first.
    assert statements[1].text == near


def test_exactly_n_even_when_too_few_usable_samples_exist() -> None:
    sampler = ScriptedSampler([[DISTINCT[0], "", ""], ["", ""], [None, None]])
    statements = collect_statements(sampler, 3)
    assert [statement.text for statement in statements] == [DISTINCT[0]] * 3


def test_no_usable_statement_at_all_is_a_generation_error() -> None:
    sampler = ScriptedSampler([["", "ok"], [None, "a b"], ["", ""]])  # "ok", "a b": under three words
    with pytest.raises(GenerationError, match="No usable statement"):
        collect_statements(sampler, 2)


def test_progress_never_goes_backwards_and_total_means_ready() -> None:
    seen: list[tuple[int, int]] = []
    progress = ProgressReporter(3, lambda done, total: seen.append((done, total)))
    for done in (0, 0, 2, 1, 3, 3):
        progress.update(done)
    progress.finish()
    assert seen == [(0, 3), (2, 3), (3, 3)]


def test_reciting_the_instructions_is_not_a_statement() -> None:
    echo = SYSTEM_PROMPT.split(". ")[0] + " and the square brackets."
    assert echoes_instructions(echo, INSTRUCTION_TEXTS)
    # Sharing a few words with the instructions is fine.
    assert not echoes_instructions("We agree on a plan that the whole group could endorse.", INSTRUCTION_TEXTS)
    sampler = ScriptedSampler([[echo, DISTINCT[0]], [DISTINCT[1]]])
    statements = collect_statements(sampler, 2, instructions=INSTRUCTION_TEXTS)
    assert [statement.text for statement in statements] == DISTINCT[:2]
