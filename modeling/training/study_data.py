"""Training data from what a study's groups rated: SFT rows and preference pairs (framework-free).

The flywheel's data shaping. research.training_data reads the database into `StudyStatement`s and
`PreferenceVote`s; this module filters them and writes rows, counting what each filter kept and
dropped so the researcher sees where the data went.

- SFT rows (`sft_rows`): statements groups rated highly. As Bakker et al. (2022) filtered their
  fine-tuning data on the raters' quality judgements, a statement is kept when its mean quality rating
  reaches `min_quality`; optionally its mean agreement reaches `min_agreement`; optionally only the
  round's welfare winner (by the raters' own agreement, with a welfare function from the one
  registry, modeling.welfare) is kept. Rows are in the plain SFT format train_generator reads
  (question, opinions, statement, group_id), plus `prompt`/`completion`: the chat the generator
  would be sent (prompts.build_messages, neutralised opinions, a seeded opinion order) and the
  statement as the assistant's answer, so trl's prompt-completion readers take the file too.
- Preference pairs (`preference_rows`): from rankings (each ranking's order gives one vote per pair
  of statements) and head-to-head preferences (one vote each). Votes are summed per round and pair;
  the majority is `chosen`, ties are dropped. Rows are in trl's conversational preference format
  (prompt: the system and user turns; chosen/rejected: one assistant turn each), which
  DPOTrainer reads.

Held-out questions never become training data: statements on questions of the `iid_test` and
`ood_test` splits are always dropped (and counted), whatever the filters, so a version trained from
a study can be evaluated on those splits without leakage.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

from modeling.generation.prompts import ChatMessage, build_messages, derive_seed, opinion_order
from modeling.welfare import WELFARE_FUNCTIONS, rank_candidates

# The splits whose questions evaluate a version; never trained on.
HELD_OUT_SPLITS = frozenset({"iid_test", "ood_test"})
# The paper kept statements of high rated quality; 5 is "somewhat good" on the 7-point scale.
DEFAULT_MIN_QUALITY = 5.0


class NothingKept(ValueError):
    """Every row was filtered out; the message says by which filter."""


@dataclass(frozen=True)
class StudyStatement:
    """One generated statement with its context and the ratings it received."""

    candidate_id: int
    round_id: int
    experiment: str
    question: str
    question_id: str
    split: str
    opinions: tuple[str, ...]
    statement: str
    # (rater id, agreement 1-7, quality 1-7), one per rater.
    ratings: tuple[tuple[int, int, int], ...] = ()

    @property
    def held_out(self) -> bool:
        return self.split in HELD_OUT_SPLITS

    @property
    def mean_quality(self) -> float | None:
        return fmean(q for _, _, q in self.ratings) if self.ratings else None

    @property
    def mean_agreement(self) -> float | None:
        return fmean(a for _, a, _ in self.ratings) if self.ratings else None


@dataclass(frozen=True)
class PreferenceVote:
    """One rater preferred `winner_id` to `loser_id` (statements of the same round)."""

    round_id: int
    winner_id: int
    loser_id: int
    source: str  # "ranking" or "head-to-head"


@dataclass
class FilterStep:
    name: str
    kept: int
    dropped: int


@dataclass
class DatasetBuild:
    rows: list[dict[str, Any]]
    steps: list[FilterStep] = field(default_factory=list)

    def report(self) -> str:
        width = max((len(step.name) for step in self.steps), default=0)
        return "\n".join(f"{step.name:<{width}}  kept {step.kept:>6}  dropped {step.dropped:>6}" for step in self.steps)


def prompt_messages(question: str, opinions: Sequence[str], *, key: str) -> list[ChatMessage]:
    """The chat the generator would be sent for these opinions, in the order seeded by `key`."""
    order = opinion_order(derive_seed("flywheel", key), 0, len(opinions))
    return build_messages(question, opinions, order)


def _step(steps: list[FilterStep], name: str, before: Sequence[Any], after: Sequence[Any]) -> None:
    steps.append(FilterStep(name, kept=len(after), dropped=len(before) - len(after)))


def _round_winners(statements: Sequence[StudyStatement], *, welfare: str, alpha: float) -> list[StudyStatement]:
    """Per round, the statement with the highest welfare of the raters' agreement.

    Only raters who rated every remaining statement of the round count, so each column of the matrix
    has the same voters; a round where no rater rated them all keeps nothing.
    """
    by_round: dict[int, list[StudyStatement]] = defaultdict(list)
    for statement in statements:
        by_round[statement.round_id].append(statement)
    winners = []
    for round_statements in by_round.values():
        agreement = [{rater: a for rater, a, _ in s.ratings} for s in round_statements]
        raters = sorted(set.intersection(*(set(column) for column in agreement)))
        if not raters:
            continue
        matrix = [[float(column[rater]) for column in agreement] for rater in raters]
        result = rank_candidates(matrix, method=welfare, alpha=alpha)
        winners.append(round_statements[result.winner])
    return sorted(winners, key=lambda s: s.candidate_id)


def sft_row(statement: StudyStatement) -> dict[str, Any]:
    key = f"candidate-{statement.candidate_id}"
    return {
        "group_id": key,
        "question": statement.question,
        "opinions": list(statement.opinions),
        "statement": statement.statement,
        "prompt": prompt_messages(statement.question, statement.opinions, key=key),
        "completion": [{"role": "assistant", "content": statement.statement}],
        "question_id": statement.question_id,
        "split": statement.split,
        "experiment": statement.experiment,
        "candidate_id": statement.candidate_id,
        "round_id": statement.round_id,
        "n_raters": len(statement.ratings),
        "mean_quality": statement.mean_quality,
        "mean_agreement": statement.mean_agreement,
    }


def sft_rows(
    statements: Sequence[StudyStatement],
    *,
    min_quality: float = DEFAULT_MIN_QUALITY,
    min_agreement: float | None = None,
    welfare: str | None = None,
    welfare_alpha: float = 1.0,
) -> DatasetBuild:
    """The statements groups rated highly, as SFT rows, with what each filter kept and dropped."""
    if welfare is not None and welfare not in WELFARE_FUNCTIONS:
        raise ValueError(f"Unknown welfare method {welfare!r}; known: {', '.join(WELFARE_FUNCTIONS)}.")
    steps: list[FilterStep] = []
    current = [s for s in statements if s.ratings]
    _step(steps, "statements with ratings", statements, current)
    kept = [s for s in current if not s.held_out]
    _step(steps, "question not in iid_test/ood_test", current, kept)
    current, kept = kept, [s for s in kept if (s.mean_quality or 0.0) >= min_quality]
    _step(steps, f"mean quality >= {min_quality:g}", current, kept)
    if min_agreement is not None:
        current, kept = kept, [s for s in kept if (s.mean_agreement or 0.0) >= min_agreement]
        _step(steps, f"mean agreement >= {min_agreement:g}", current, kept)
    if welfare is not None:
        current, kept = kept, _round_winners(kept, welfare=welfare, alpha=welfare_alpha)
        _step(steps, f"{welfare} welfare winner of its round", current, kept)
    build = DatasetBuild(rows=[sft_row(s) for s in kept], steps=steps)
    if not build.rows:
        raise NothingKept("No statement was kept:\n" + build.report())
    return build


def preference_rows(
    statements: Mapping[int, StudyStatement], votes: Sequence[PreferenceVote], *, min_margin: int = 1
) -> DatasetBuild:
    """Chosen/rejected pairs: per round and pair of statements, the majority of the votes (ties dropped)."""
    if min_margin < 1:
        raise ValueError("min_margin must be at least 1")
    steps: list[FilterStep] = []
    for source in ("ranking", "head-to-head"):
        count = sum(1 for vote in votes if vote.source == source)
        steps.append(FilterStep(f"votes from {source}", kept=count, dropped=0))
    known = [v for v in votes if v.winner_id in statements and v.loser_id in statements]
    _step(steps, "votes on known statements", votes, known)
    current, known = known, [v for v in known if not statements[v.winner_id].held_out]
    _step(steps, "question not in iid_test/ood_test", current, known)

    tally: dict[tuple[int, int, int], list[int]] = defaultdict(lambda: [0, 0])
    for vote in known:
        low, high = sorted((vote.winner_id, vote.loser_id))
        tally[(vote.round_id, low, high)][0 if vote.winner_id == low else 1] += 1
    pairs = sorted(tally.items())
    decided = [(key, counts) for key, counts in pairs if abs(counts[0] - counts[1]) >= min_margin]
    _step(steps, f"pairs (per round) with a majority of >= {min_margin}", pairs, decided)

    rows = []
    for (round_id, low, high), (low_wins, high_wins) in decided:
        chosen, rejected = (statements[low], statements[high]) if low_wins > high_wins else (statements[high], statements[low])
        rows.append(
            {
                "prompt": prompt_messages(chosen.question, chosen.opinions, key=f"round-{round_id}"),
                "chosen": [{"role": "assistant", "content": chosen.statement}],
                "rejected": [{"role": "assistant", "content": rejected.statement}],
                "group_id": f"round-{round_id}",
                "round_id": round_id,
                "chosen_id": chosen.candidate_id,
                "rejected_id": rejected.candidate_id,
                "votes_chosen": max(low_wins, high_wins),
                "votes_rejected": min(low_wins, high_wins),
                "question_id": chosen.question_id,
                "split": chosen.split,
                "experiment": chosen.experiment,
            }
        )
    build = DatasetBuild(rows=rows, steps=steps)
    if not rows:
        raise NothingKept("No preference pair was kept:\n" + build.report())
    return build


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> int:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with target.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


# --- reading a preference file back (DPO's input) --------------------------------------------


@dataclass(frozen=True)
class PreferencePair:
    group_id: str
    prompt: tuple[tuple[str, str], ...]  # (role, content) turns
    chosen: str
    rejected: str

    def as_trl(self) -> dict[str, list[dict[str, str]]]:
        """trl's conversational preference row."""
        return {
            "prompt": [{"role": role, "content": content} for role, content in self.prompt],
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
        }


class PreferenceDataError(ValueError):
    """A preference row is malformed; the message names the file and line."""


def _assistant_text(value: Any, where: str, name: str) -> str:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], Mapping):
        content = value[0].get("content")
        if value[0].get("role") == "assistant" and isinstance(content, str) and content.strip():
            return content.strip()
    raise PreferenceDataError(f"{where}: {name!r} must be a non-empty string or one assistant turn")


def load_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """Rows of build_preference_dataset's format (prompt turns, chosen, rejected)."""
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise PreferenceDataError(f"{where}: invalid JSON ({error})") from error
            if not isinstance(raw, Mapping):
                raise PreferenceDataError(f"{where}: expected a JSON object")
            prompt = raw.get("prompt")
            if not isinstance(prompt, list) or not prompt or not all(
                isinstance(turn, Mapping) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)
                for turn in prompt
            ):
                raise PreferenceDataError(f"{where}: 'prompt' must be a non-empty list of chat turns")
            chosen = _assistant_text(raw.get("chosen"), where, "chosen")
            rejected = _assistant_text(raw.get("rejected"), where, "rejected")
            turns = tuple((str(turn["role"]), str(turn["content"])) for turn in prompt)
            pairs.append(PreferencePair(str(raw.get("group_id") or where), turns, chosen, rejected))
    return pairs
