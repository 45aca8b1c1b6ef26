"""Synthetic stance ratings composed from the question bank's `train` questions (deterministic by seed).

    python -m modeling.training.stance_rows --questions ../shared/data/hm_questions.json \\
        --n-questions 600 --seed 0 --out /tmp/stance_rows.jsonl

Every row is made like this (and only like this), one group per question:

- The question bank gives each `train` question an affirming statement A and a
  negating statement N ("X should NOT ..."; the capitals are lowered so the model
  cannot key on them). Questions whose text appears in an iid_test/ood_test entry
  are never used (`split == "train"` only; the caller can pass more texts to exclude).
- Members (4 per group) hold one of five stances: pro, con, lean-pro, lean-con,
  unsure; every group has at least one pro and one con member. An opinion is a
  template filled with A and/or N, drawn from several wordings per stance (plain
  assertions, "I disagree that A" negations, hedges, lower-case chatty text,
  personal asides), so the model cannot separate the stances by wording alone.
- Candidates (5 per group): pro (asserts A), con (asserts N), balanced (names both
  sides and a compromise), vague (on-topic platitude with no position) and
  off-topic (the pro statement of another random train question).
- Agreement = round(BASE[stance][kind] + Gaussian noise (sd 0.5)), clipped to 1-7,
  with BASE below: a member rates a statement of their own side high, of the other
  side low, a balanced one in the middle (higher for hedging members), a vague one
  low-middle and an off-topic one low.

The labels are the generator's rules, not people's judgements: these rows teach
the notion of stance across thousands of questions; the team-written seed groups
(modeling/data/consensus_seed_ratings.jsonl) teach how people rate real statements.

This module imports neither Django nor torch.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

STANCES = ("pro", "con", "lean_pro", "lean_con", "unsure")
KINDS = ("pro", "con", "balanced", "vague", "off_topic")

BASE: dict[str, dict[str, float]] = {
    "pro": {"pro": 6.5, "con": 1.5, "balanced": 4.0, "vague": 2.8, "off_topic": 1.4},
    "con": {"pro": 1.5, "con": 6.5, "balanced": 4.0, "vague": 2.8, "off_topic": 1.4},
    "lean_pro": {"pro": 5.2, "con": 2.4, "balanced": 5.5, "vague": 3.2, "off_topic": 1.5},
    "lean_con": {"pro": 2.4, "con": 5.2, "balanced": 5.5, "vague": 3.2, "off_topic": 1.5},
    "unsure": {"pro": 3.4, "con": 3.4, "balanced": 5.6, "vague": 3.8, "off_topic": 1.8},
}
NOISE_SD = 0.5

# {a}: affirming body (mid-sentence), {n}: negating body, {A}/{N}: as sentences.
OPINIONS: dict[str, tuple[str, ...]] = {
    "pro": (
        "Yes. {A}.",
        "I'm convinced that {a}.",
        "honestly i think {a}, thats just how i see it",
        "Definitely. {A}. I've seen why in my own life and I won't pretend otherwise.",
        "From where I stand, {a}. The arguments against it don't hold up for me.",
        "I'd say yes without much hesitation: {a}.",
        "I strongly disagree with anyone who says that {n}.",
    ),
    "con": (
        "No. {N}.",
        "I'm convinced that {n}.",
        "honestly i dont think so, {n} in my view",
        "I really don't agree that {a}. I've seen the downside up close.",
        "From where I stand, {n}. The arguments for it don't hold up for me.",
        "I'd say no without much hesitation: {n}.",
        "I strongly disagree with the idea that {a}.",
    ),
    "lean_pro": (
        "Mostly yes, though I have doubts. On balance {a}, but the costs are real and need handling.",
        "I lean towards thinking {a}, with conditions and safeguards.",
        "probably yes? {a} in most cases but not all of them",
    ),
    "lean_con": (
        "Mostly no, though I see the appeal. On balance {n}, but the other side has a point.",
        "I lean towards thinking {n}, unless things change a lot.",
        "probably not? {n} in most cases, but i get why people want it",
    ),
    "unsure": (
        "I'm torn. Part of me thinks {a}, part of me thinks {n}.",
        "Honestly unsure. There are good arguments both ways and I'd want a middle path.",
        "it depends a lot on the details, i can see both sides of this one",
    ),
}
STATEMENTS: dict[str, tuple[str, ...]] = {
    "pro": (
        "We believe {a}. That is where we land after hearing each other out.",
        "Most of us are convinced that {a}, and we would act on that view.",
        "Our shared position is clear: {a}.",
        "{A}. We think the benefits outweigh the risks and would support it.",
    ),
    "con": (
        "We believe {n}. That is where we land after hearing each other out.",
        "Most of us are convinced that {n}, and we would act on that view.",
        "Our shared position is clear: {n}.",
        "{N}. We think the risks outweigh the benefits and would oppose it.",
    ),
    "balanced": (
        "Some of us hold that {a}, while others think {n}. We agree that any answer should weigh both "
        "concerns and start with small, reversible steps.",
        "We are split: part of the group believes {a}, part believes {n}. A version most of us could live "
        "with keeps safeguards for those who would lose out.",
    ),
    "vague": (
        "This is a complex issue with many perspectives, and we believe it deserves careful thought and respectful dialogue.",
        "We recognise that the question of whether {a} raises important considerations on all sides, and we value continued discussion.",
        "There is no simple answer here; what matters most is that everyone is heard and treated with respect.",
    ),
}


def _body(statement: str) -> str:
    """'Britain should NOT ...' -> 'britain should not ...' (mid-sentence, capitals of NOT lowered)."""
    text = re.sub(r"\bNOT\b", "not", statement.strip()).rstrip(".")
    if len(text) > 1 and text[0].isupper() and not text[1].isupper():
        text = text[0].lower() + text[1:]
    return text


def _sentence(body: str) -> str:
    return body[:1].upper() + body[1:]


def _fill(template: str, affirming: str, negating: str) -> str:
    a, n = _body(affirming), _body(negating)
    return template.format(a=a, n=n, A=_sentence(a), N=_sentence(n))


def train_questions(bank: Sequence[Mapping[str, Any]], exclude: Iterable[str] = ()) -> list[Mapping[str, Any]]:
    """The bank's `train` questions with both statements, minus any whose text is in `exclude`."""
    held_out = {text.strip().lower() for text in exclude}
    held_out |= {str(q["question"]).strip().lower() for q in bank if q.get("split") != "train"}
    return [
        q
        for q in bank
        if q.get("split") == "train"
        and q.get("affirming_statement")
        and q.get("negating_statement")
        and str(q["question"]).strip().lower() not in held_out
    ]


def make_stance_rows(
    questions: Sequence[Mapping[str, Any]],
    *,
    n_questions: int,
    members: int = 4,
    seed: int = 0,
    group_prefix: str = "syn",
) -> list[dict[str, Any]]:
    """Rows in the reward-model JSONL schema, one group per question; see the module docstring."""
    if len(questions) < n_questions + 1:
        raise ValueError(f"need more than {n_questions} train questions, got {len(questions)}")
    if members < 2:
        raise ValueError("members must be >= 2 so both sides are present")
    rng = random.Random(seed)
    chosen = rng.sample(list(questions), n_questions)
    rows: list[dict[str, Any]] = []
    for index, item in enumerate(chosen):
        affirming, negating = str(item["affirming_statement"]), str(item["negating_statement"])
        stances = ["pro", "con"] + [rng.choice(STANCES) for _ in range(members - 2)]
        rng.shuffle(stances)
        other = rng.choice([q for q in questions if q["question"] != item["question"]])
        candidates: list[tuple[str, str]] = []
        for kind in KINDS:
            if kind == "off_topic":
                text = _fill(rng.choice(STATEMENTS["pro"]), str(other["affirming_statement"]), str(other["negating_statement"]))
            else:
                text = _fill(rng.choice(STATEMENTS[kind]), affirming, negating)
            candidates.append((kind, text))
        rng.shuffle(candidates)
        for member, stance in enumerate(stances):
            opinion = _fill(rng.choice(OPINIONS[stance]), affirming, negating)
            for kind, text in candidates:
                agreement = round(BASE[stance][kind] + rng.gauss(0.0, NOISE_SD))
                rows.append(
                    {
                        "group_id": f"{group_prefix}-{index:04d}",
                        "participant_id": f"m{member}",
                        "question": str(item["question"]),
                        "opinion": opinion,
                        "statement": text,
                        "agreement": min(7, max(1, agreement)),
                        "stance": stance,
                        "kind": kind,
                    }
                )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", default=str(Path(__file__).resolve().parents[3] / "shared/data/hm_questions.json"))
    parser.add_argument("--n-questions", type=int, default=600)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    bank = json.loads(Path(args.questions).read_text(encoding="utf-8"))
    rows = make_stance_rows(train_questions(bank), n_questions=args.n_questions, members=args.members, seed=args.seed)
    with Path(args.out).open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
