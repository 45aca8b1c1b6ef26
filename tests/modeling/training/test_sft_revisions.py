"""Revision examples in supervised fine-tuning: the critique round's prompt, with the revised statement as target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modeling.generation.prompts import RevisionContext, build_messages
from modeling.training.consensus_data import load_groups as load_seed_groups
from modeling.training.sft import SFTDataError, build_sft_examples, dataset_sha256, load_groups

SEED = Path(__file__).resolve().parents[3] / "modeling" / "data" / "consensus_seed.jsonl"


def test_revision_examples_are_added_only_when_asked_and_use_the_critique_rounds_prompt() -> None:
    groups = load_groups([SEED])
    with_revision = [g for g in groups if g.critiques]
    assert len(with_revision) >= 50
    plain = build_sft_examples(groups, seed=1, shuffles_per_group=2)
    both = build_sft_examples(groups, seed=1, shuffles_per_group=2, revisions=True)
    assert len(both) == len(plain) + 2 * len(with_revision)
    # Without --revisions nothing changes, digest included.
    assert dataset_sha256(both[: len(plain)]) != dataset_sha256(both) and all(not e.critiques for e in plain)
    group = with_revision[0]
    example = next(e for e in both if e.critiques and e.group_id == group.group_id)
    messages = example.messages()
    context = RevisionContext(previous_statement=group.statement, critiques=group.critiques)
    assert messages[:2] == build_messages(group.question, group.opinions, list(example.order), revision=context)
    assert messages[2] == {"role": "assistant", "content": group.revised_statement}
    # The seed loader's groups (consensus_data) give the same examples.
    assert build_sft_examples(load_seed_groups(SEED), seed=1, shuffles_per_group=2, revisions=True) == both


def test_a_malformed_revision_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "groups.jsonl"
    path.write_text(json.dumps({"question": "Q?", "opinions": ["a", "b"], "statement": "We.", "revision": {"critiques": ["x"], "revised_statement": "We."}}) + "\n")
    with pytest.raises(SFTDataError, match=r"groups.jsonl:1: 'revision.critiques'"):
        load_groups([path])
