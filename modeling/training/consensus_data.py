"""The seed consensus dataset: typed loader, validator and reward-row export (framework-free).

One JSON object per line (datasheet and style guide: docs/data/consensus-seed.md):

    {"group_id": "s1-001", "question_id": "S173964970", "question": "...",
     "opinions": ["...", "...", "..."],                      # 3-5 members
     "statement": "...",                                     # 40-120 words, in the group's voice
     "tags": {"injection": [3], "off_topic": [1]},           # optional: opinion indexes
     "alternatives": [{"kind": "one_sided", "statement": "..."}, ...],   # optional, 2-3
     "agreement": [[6, 2, 3], ...],                          # with alternatives: per member, 1-7 for the
                                                             # statement, then each alternative
     "revision": {"critiques": [...], "revised_statement": "..."}}       # optional, one critique per member

`load_groups(path)` validates every rule of the writers' validator (/work/seedwork/validate.py when the
data was written) and raises `DatasetError` naming each bad line; `check_splits` / `check_file_against_bank`
check the questions against the Habermas Machine bank's splits (training files must hold no iid_test or
ood_test question, not even quoted inside an opinion). `reward_rows` turns the agreement labels into the
reward model's rating rows (modeling/reward/training.py), one per member and candidate:

    python -m modeling.training.consensus_data reward-rows modeling/data/consensus_seed.jsonl \\
        --out modeling/data/consensus_seed_ratings.jsonl

This module imports neither Django nor torch.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import re
import statistics
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# modeling.reward.training.ROW_FIELDS, repeated here so that reading the groups does not import torch;
# tests/modeling/training checks the two stay equal.
REWARD_ROW_FIELDS = ("group_id", "participant_id", "question", "opinion", "statement", "agreement")

REQUIRED_FIELDS = ("group_id", "question_id", "question", "opinions", "statement")
OPTIONAL_FIELDS = ("tags", "alternatives", "agreement", "revision")
TAG_KINDS = ("injection", "off_topic")
ALTERNATIVE_KINDS = ("one_sided", "vague", "missing_member")
MIN_MEMBERS, MAX_MEMBERS = 3, 5
STATEMENT_WORDS = (40, 120)
ALTERNATIVE_WORDS = (15, 140)
MIN_ALTERNATIVES, MAX_ALTERNATIVES = 2, 3
LIKERT_MIN, LIKERT_MAX = 1, 7
SPLITS = ("train", "iid_test", "ood_test")
EVALUATION_SPLITS = ("iid_test", "ood_test")
# The statement's first two words may open at most this share of a file's statements (and at least 3).
MAX_OPENING_SHARE = 10

META = re.compile(
    r"\b(participants?|mediators?|here is|here's|this statement|consensus statement|as an ai|"
    r"(person|member|participant|opinion|speaker) ?#?\d|the group's statement|in summary,? the group|"
    r"first opinion|second opinion|third opinion|the opinions)\b",
    re.I,
)
FIRST_SINGULAR = re.compile(r"\b(I|I'm|I've|I'd|me|my|mine|myself)\b")
GROUP_VOICE = re.compile(r"\b(we|us|our|ours|ourselves)\b", re.I)
URL = re.compile(r"(https?://|www\.|\b[\w-]+\.(com|net|org|example|io|biz|info|xyz)\b)", re.I)
SHOUTED_WORD = re.compile(r"\b[A-Z]{4,}\b")
MAX_PROBLEMS_IN_MESSAGE = 25


class DatasetError(ValueError):
    """A consensus file is unreadable or breaks a rule; every problem names its line (`problems` lists them)."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        shown = self.problems[:MAX_PROBLEMS_IN_MESSAGE]
        more = len(self.problems) - len(shown)
        super().__init__("\n".join(shown) + (f"\n... and {more} more" if more > 0 else ""))


@dataclass(frozen=True)
class Alternative:
    """A worse statement for the same group: one_sided, vague or missing_member."""

    kind: str
    statement: str


@dataclass(frozen=True)
class Revision:
    """One critique of the statement per member (opinion order), and the statement rewritten to answer them."""

    critiques: tuple[str, ...]
    revised_statement: str


@dataclass(frozen=True)
class ConsensusGroup:
    group_id: str
    question_id: str
    question: str
    opinions: tuple[str, ...]
    statement: str
    injection: tuple[int, ...] = ()
    off_topic: tuple[int, ...] = ()
    alternatives: tuple[Alternative, ...] = ()
    # agreement[member][0] is that member's 1-7 rating of `statement`, agreement[member][1 + k] of alternative k.
    agreement: tuple[tuple[int, ...], ...] | None = None
    revision: Revision | None = None
    line: int = field(default=0, compare=False)

    @property
    def size(self) -> int:
        return len(self.opinions)

    def candidates(self) -> list[tuple[str, str]]:
        """(kind, text) in agreement-column order: ("statement", ...) first, then each alternative."""
        return [("statement", self.statement)] + [(alt.kind, alt.statement) for alt in self.alternatives]

    def texts(self) -> Iterator[str]:
        """Every free text in the group."""
        yield self.question
        yield from self.opinions
        yield self.statement
        for alt in self.alternatives:
            yield alt.statement
        if self.revision is not None:
            yield from self.revision.critiques
            yield self.revision.revised_statement

    def to_dict(self) -> dict[str, Any]:
        """The JSON object this group was read from (empty optional parts omitted)."""
        out: dict[str, Any] = {
            "group_id": self.group_id,
            "question_id": self.question_id,
            "question": self.question,
            "opinions": list(self.opinions),
            "statement": self.statement,
        }
        tags = {name: list(idx) for name, idx in (("injection", self.injection), ("off_topic", self.off_topic)) if idx}
        if tags:
            out["tags"] = tags
        if self.alternatives:
            out["alternatives"] = [{"kind": alt.kind, "statement": alt.statement} for alt in self.alternatives]
        if self.agreement is not None:
            out["agreement"] = [list(row) for row in self.agreement]
        if self.revision is not None:
            out["revision"] = {"critiques": list(self.revision.critiques), "revised_statement": self.revision.revised_statement}
        return out


def words(text: str) -> int:
    return len(text.split())


def norm(text: str) -> str:
    """Lowercase, punctuation to single spaces: how question texts are compared."""
    return re.sub(r"\W+", " ", text.lower()).strip()


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_rating(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and LIKERT_MIN <= value <= LIKERT_MAX


def _statement_problems(text: str, what: str) -> list[str]:
    problems = []
    count = words(text)
    low, high = STATEMENT_WORDS
    if not low <= count <= high:
        problems.append(f"{what} has {count} words ({low}-{high})")
    if match := META.search(text):
        problems.append(f"{what} has meta-talk: {match.group(0)!r}")
    if match := FIRST_SINGULAR.search(text):
        problems.append(f"{what} uses first person singular: {match.group(0)!r}")
    if not GROUP_VOICE.search(text):
        problems.append(f"{what} is not in the group's voice (we/our)")
    if URL.search(text):
        problems.append(f"{what} contains a URL or domain")
    return problems


def check_record(raw: Any, where: str) -> tuple[ConsensusGroup | None, list[str]]:
    """Validate one parsed line on its own; `where` (e.g. "consensus_seed.jsonl line 7") prefixes each problem.

    Returns the group when it has no problem, else None and the problems.
    """
    problems: list[str] = []

    def fail(message: str) -> None:
        problems.append(f"{where}: {message}")

    if not isinstance(raw, dict):
        fail(f"expected a JSON object, got {type(raw).__name__}")
        return None, problems
    missing = [name for name in REQUIRED_FIELDS if name not in raw]
    if missing:
        fail(f"missing {', '.join(missing)}")
        return None, problems
    extra = set(raw) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS)
    if extra:
        fail(f"unknown fields {sorted(extra)}")
    for name in ("group_id", "question_id", "question", "statement"):
        if not _is_text(raw[name]):
            fail(f"{name} must be a non-empty string")
    if problems:
        return None, problems

    opinions = raw["opinions"]
    if not isinstance(opinions, list) or not MIN_MEMBERS <= len(opinions) <= MAX_MEMBERS or not all(_is_text(o) for o in opinions):
        fail(f"opinions must be {MIN_MEMBERS}-{MAX_MEMBERS} non-empty strings")
        return None, problems
    if len(set(opinions)) != len(opinions):
        fail("repeated opinion")
    statement = raw["statement"]
    problems.extend(f"{where}: {p}" for p in _statement_problems(statement, "statement"))

    tags = raw.get("tags", {})
    indexes: dict[str, tuple[int, ...]] = {}
    if not isinstance(tags, dict) or set(tags) - set(TAG_KINDS):
        fail("tags must be {'injection': [...], 'off_topic': [...]}")
    else:
        for name, idx in tags.items():
            if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(opinions) for i in idx):
                fail(f"tags.{name} must list opinion indexes")
            else:
                indexes[name] = tuple(idx)
    for i in indexes.get("injection", ()):
        shouted = set(SHOUTED_WORD.findall(opinions[i]))
        leaked = sorted(w for w in shouted if re.search(rf"\b{w}\b", statement))
        if leaked:
            fail(f"statement repeats the injected payload {leaked}")

    alternatives: list[Alternative] = []
    agreement: tuple[tuple[int, ...], ...] | None = None
    alts = raw.get("alternatives")
    if alts is not None:
        if not isinstance(alts, list) or not MIN_ALTERNATIVES <= len(alts) <= MAX_ALTERNATIVES:
            fail(f"alternatives must be a list of {MIN_ALTERNATIVES} or {MAX_ALTERNATIVES}")
        else:
            low, high = ALTERNATIVE_WORDS
            for alt in alts:
                if (
                    not isinstance(alt, dict)
                    or set(alt) != {"kind", "statement"}
                    or alt["kind"] not in ALTERNATIVE_KINDS
                    or not _is_text(alt["statement"])
                ):
                    fail("each alternative is {kind: one_sided|vague|missing_member, statement}")
                elif not low <= words(alt["statement"]) <= high:
                    fail(f"alternative has {words(alt['statement'])} words ({low}-{high})")
                else:
                    alternatives.append(Alternative(kind=alt["kind"], statement=alt["statement"]))
            columns = 1 + len(alts)
            agr: Any = raw.get("agreement")
            shape_ok = (
                isinstance(agr, list)
                and len(agr) == len(opinions)
                and all(isinstance(r, list) and len(r) == columns and all(_is_rating(x) for x in r) for r in agr)
            )
            if not shape_ok:
                fail(
                    f"agreement must be one list per member of {columns} integers {LIKERT_MIN}-{LIKERT_MAX}"
                    " (statement first, then each alternative)"
                )
            else:
                means = [sum(r[j] for r in agr) / len(agr) for j in range(columns)]
                mins = [min(r[j] for r in agr) for j in range(columns)]
                if any(means[0] <= m for m in means[1:]) and any(mins[0] <= m for m in mins[1:]):
                    fail("the consensus statement should beat each alternative on mean or worst-off agreement")
                if len({tuple(r) for r in agr}) == 1:
                    fail("every member gives identical ratings; members differ")
                agreement = tuple(tuple(r) for r in agr)
    elif "agreement" in raw:
        fail("agreement without alternatives")

    revision: Revision | None = None
    rev = raw.get("revision")
    if rev is not None:
        fields: dict[str, Any] = rev if isinstance(rev, dict) else {}
        critiques: Any = fields.get("critiques")
        revised: Any = fields.get("revised_statement")
        if set(fields) - {"critiques", "revised_statement"}:
            fail(f"unknown revision fields {sorted(set(fields) - {'critiques', 'revised_statement'})}")
        if not isinstance(critiques, list) or len(critiques) != len(opinions) or not all(_is_text(c) for c in critiques):
            fail("revision.critiques must have one critique per member")
        revised_problems = _statement_problems(revised, "revised statement") if _is_text(revised) else ["not a string"]
        if revised_problems:
            fail(
                "revision.revised_statement must follow the statement rules (40-120 words, we-voice, no meta, no I, no URL): "
                + "; ".join(revised_problems)
            )
        elif revised == statement:
            fail("revised statement must differ from the statement")
        if isinstance(critiques, list) and not revised_problems:
            revision = Revision(critiques=tuple(critiques), revised_statement=revised)

    if problems:
        return None, problems
    return (
        ConsensusGroup(
            group_id=raw["group_id"],
            question_id=raw["question_id"],
            question=raw["question"],
            opinions=tuple(opinions),
            statement=statement,
            injection=indexes.get("injection", ()),
            off_topic=indexes.get("off_topic", ()),
            alternatives=tuple(alternatives),
            agreement=agreement,
            revision=revision,
        ),
        [],
    )


def validate_lines(lines: Iterable[str], source: str = "") -> tuple[list[ConsensusGroup], list[str]]:
    """Every rule, per line and across the file: unique group ids and questions, varied openings.

    Line numbers are 1-based and count blank lines (which are skipped), as an editor shows them.
    """
    prefix = f"{source} " if source else ""
    groups: list[ConsensusGroup] = []
    problems: list[str] = []
    first_line: dict[tuple[str, str], int] = {}
    openings: collections.Counter[str] = collections.Counter()
    count = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{prefix}line {number}"
        count += 1
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(f"{where}: not JSON: {error.msg} at column {error.colno}")
            continue
        if isinstance(raw, dict):
            for key in ("group_id", "question_id"):
                value = raw.get(key)
                if isinstance(value, str) and value:
                    if (key, value) in first_line:
                        what = "duplicate group_id" if key == "group_id" else "question used twice:"
                        problems.append(f"{where}: {what} {value} (first on line {first_line[key, value]})")
                    else:
                        first_line[key, value] = number
            if isinstance(raw.get("statement"), str):
                openings[" ".join(raw["statement"].split()[:2]).lower()] += 1
        group, group_problems = check_record(raw, where)
        problems.extend(group_problems)
        if group is not None:
            groups.append(replace(group, line=number))
    if openings:
        top, times = openings.most_common(1)[0]
        if times > max(3, count // MAX_OPENING_SHARE):
            problems.append(f"{source or 'file'}: {times} of {count} statements open with {top!r}; vary the openings")
    return groups, problems


def _read_lines(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8").split("\n")
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} is not UTF-8 text: {error}") from error


def load_groups(path: str | Path, bank_path: str | Path | None = None, split: str | None = None) -> list[ConsensusGroup]:
    """Validated groups from a JSONL file; with `bank_path` and `split`, also checks the questions' split.

    Raises DatasetError listing every problem (each names its line).
    """
    groups, problems = validate_lines(_read_lines(path), source=str(path))
    if not groups and not problems:
        problems.append(f"{path} holds no groups")
    if bank_path is not None:
        if split is None:
            raise ValueError("checking against the bank needs the split the file is on")
        problems.extend(check_splits(groups, load_bank(bank_path), split, source=str(path)))
    if problems:
        raise DatasetError(problems)
    return groups


# --- The question bank's splits -----------------------------------------------------------------------


def load_bank(path: str | Path) -> dict[str, dict[str, Any]]:
    """The Habermas Machine question bank (a JSON list of {id, question, split, topic, ...}) by id."""
    path = Path(path)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise DatasetError(f"cannot read the question bank {path}: {error.strerror or error}") from error
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"the question bank {path} is not JSON: {error}") from error
    if not isinstance(items, list) or not all(isinstance(q, dict) and {"id", "question", "split"} <= set(q) for q in items):
        raise DatasetError(f"the question bank {path} must be a list of objects with id, question and split")
    return {q["id"]: q for q in items}


def check_splits(groups: Sequence[ConsensusGroup], bank: dict[str, dict[str, Any]], split: str, source: str = "") -> list[str]:
    """Problems with the groups' questions against the bank (empty when none).

    Every question must be a `split` question of the bank, copied exactly. A training file (split "train")
    must also hold no evaluation (iid_test/ood_test) question's text anywhere, not even inside an opinion.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    prefix = f"{source} " if source else ""
    held = {norm(q["question"]) for q in bank.values() if q["split"] in EVALUATION_SPLITS} if split == "train" else set()
    held.discard("")
    problems: list[str] = []
    for group in groups:
        where = f"{prefix}line {group.line}" if group.line else f"{prefix}group {group.group_id}"
        item = bank.get(group.question_id)
        if item is None:
            problems.append(f"{where}: question_id {group.question_id} is not in the bank")
        elif item["split"] != split:
            problems.append(f"{where}: question_id {group.question_id} is a {item['split']} question, not {split}")
        elif group.question != item["question"]:
            problems.append(f"{where}: question text differs from the bank's")
        if held:
            flat = " " + " ".join(norm(text) for text in group.texts()) + " "
            for text in held:
                if f" {text} " in flat:
                    problems.append(f"{where}: contains the evaluation question text {text!r}")
                    break
    return problems


def check_file_against_bank(path: str | Path, bank_path: str | Path, split: str) -> list[str]:
    """Problems with a consensus file's questions against the bank at `bank_path` (empty when none).

    Raises DatasetError when the file or the bank cannot be read or the file breaks a format rule.
    """
    return check_splits(load_groups(path), load_bank(bank_path), split, source=str(path))


# --- Reward rows, hashes, statistics -------------------------------------------------------------------


def reward_rows(groups: Iterable[ConsensusGroup]) -> list[dict[str, Any]]:
    """The reward model's rating rows (modeling/reward/training.py ROW_FIELDS), from groups with `agreement`.

    One row per member and candidate (the statement, then each alternative): `opinion` is the member's own
    opinion as written (an injected instruction included), `participant_id` is "m<opinion index>" (ids
    are unique within a group, as the reward trainer expects).
    """
    rows: list[dict[str, Any]] = []
    for group in groups:
        if group.agreement is None:
            continue
        candidates = group.candidates()
        for member, (opinion, ratings) in enumerate(zip(group.opinions, group.agreement)):
            for (_kind, text), rating in zip(candidates, ratings):
                rows.append(
                    {
                        "group_id": group.group_id,
                        "participant_id": f"m{member}",
                        "question": group.question,
                        "opinion": opinion,
                        "statement": text,
                        "agreement": rating,
                    }
                )
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write one compact JSON object per line (UTF-8, non-ASCII kept); returns the number of rows."""
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    Path(path).write_text("".join(lines), encoding="utf-8")
    return len(lines)


def dataset_sha256(path: str | Path) -> str:
    """sha256 of the file's bytes: pins the exact file a model was trained or evaluated on.

    (modeling.reward.training.dataset_sha256 hashes parsed rating rows instead, independent of order.)
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def is_evaluation_name(path: str | Path) -> bool:
    """Evaluation files carry "dev" or "eval" in their name (the repository's hooks rely on it)."""
    name = Path(path).name.lower()
    return "dev" in name or "eval" in name


def summarise(groups: Sequence[ConsensusGroup], bank: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The counts the datasheet reports."""
    lengths = sorted(words(g.statement) for g in groups)
    kinds = collections.Counter(alt.kind for g in groups for alt in g.alternatives)
    summary: dict[str, Any] = {
        "groups": len(groups),
        "distinct_questions": len({g.question_id for g in groups}),
        "group_sizes": dict(sorted(collections.Counter(g.size for g in groups).items())),
        "opinions": sum(g.size for g in groups),
        "injection_opinions": sum(len(g.injection) for g in groups),
        "groups_with_injection": sum(1 for g in groups if g.injection),
        "off_topic_opinions": sum(len(g.off_topic) for g in groups),
        "groups_with_off_topic": sum(1 for g in groups if g.off_topic),
        "groups_with_alternatives": sum(1 for g in groups if g.alternatives),
        "groups_with_agreement": sum(1 for g in groups if g.agreement is not None),
        "alternatives": sum(kinds.values()),
        "alternatives_by_kind": {kind: kinds[kind] for kind in ALTERNATIVE_KINDS},
        "groups_with_revision": sum(1 for g in groups if g.revision is not None),
        "reward_rows": len(reward_rows(groups)),
    }
    if lengths:
        quartiles = statistics.quantiles(lengths, n=4) if len(lengths) > 1 else [lengths[0]] * 3
        summary["statement_words"] = {
            "min": lengths[0],
            "q1": quartiles[0],
            "median": statistics.median(lengths),
            "q3": quartiles[2],
            "max": lengths[-1],
            "mean": round(statistics.fmean(lengths), 1),
        }
        openings = collections.Counter(" ".join(g.statement.split()[:2]).lower() for g in groups)
        summary["most_common_opening"] = dict([openings.most_common(1)[0]])
    if bank is not None:
        topics = {bank[g.question_id].get("topic") for g in groups if g.question_id in bank}
        summary["topics"] = len(topics)
        summary["splits"] = dict(collections.Counter(bank[g.question_id]["split"] for g in groups if g.question_id in bank))
    return summary


# --- Command line ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeling.training.consensus_data",
        description="Validate the seed consensus dataset and export its reward-model rating rows.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    bank_help = "the question bank (e.g. ../shared/data/hm_questions.json) to check the questions' split against"

    validate = commands.add_parser("validate", help="check every rule; exit 1 on any problem")
    validate.add_argument("path")
    validate.add_argument("--bank", help=bank_help)
    validate.add_argument("--split", choices=SPLITS, help="the split the file's questions come from (with --bank)")

    export = commands.add_parser("reward-rows", help="write the reward model's rating rows (JSONL)")
    export.add_argument("path")
    export.add_argument("--out", required=True)
    export.add_argument("--bank", help=bank_help)
    export.add_argument("--split", choices=SPLITS)

    stats = commands.add_parser("stats", help="print the datasheet's counts as JSON")
    stats.add_argument("path")
    stats.add_argument("--bank", help="the question bank, for the topic and split counts")

    args = parser.parse_args(argv)
    if getattr(args, "bank", None) and args.command != "stats" and not args.split:
        parser.error("--bank needs --split")
    try:
        if args.command == "stats":
            groups = load_groups(args.path)
            print(json.dumps(summarise(groups, load_bank(args.bank) if args.bank else None), indent=2))
            return 0
        groups = load_groups(args.path, args.bank, args.split)
        if args.command == "validate":
            print(f"{args.path}: {len(groups)} groups, 0 problems; sha256 {dataset_sha256(args.path)}")
            return 0
        if is_evaluation_name(args.path) and not is_evaluation_name(args.out):
            parser.error(f'{args.out}: rows from an evaluation file need "dev" or "eval" in their file name')
        count = write_jsonl(reward_rows(groups), args.out)
        print(f"{args.out}: {count} rows from {sum(1 for g in groups if g.agreement)} groups; sha256 {dataset_sha256(args.out)}")
        return 0
    except DatasetError as error:
        print(error, file=sys.stderr)
        if error.problems and len(error.problems) > 1:
            print(f"{len(error.problems)} problems", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
