"""Rank candidates from a JSON file of (predicted) agreement scores, without the database.

    python manage.py rank_candidates --method schulze --input scores.json

Input:  {"participants": [ids], "candidates": [ids], "scores": [[score per candidate] per participant]}
Output: {"ranking": [candidate ids, best first], "welfare": {candidate id: number}}
        (+ "explanation" with --explain)
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from modeling.welfare import TIE_BREAKS, WELFARE_FUNCTIONS, describe_choice, rank_candidates


def _load_input(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise CommandError(f"cannot read {path}: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise CommandError(f"{path} is not UTF-8 text: {error}") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CommandError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from error
    if not isinstance(data, dict):
        raise CommandError(f"{path} must hold a JSON object with participants, candidates and scores")
    missing = [key for key in ("participants", "candidates", "scores") if key not in data]
    if missing:
        raise CommandError(f"{path} is missing key(s): {', '.join(missing)}")
    return data


def _validate_ids(ids: Any, kind: str) -> list[Any]:
    if not isinstance(ids, list) or not ids:
        raise CommandError(f"'{kind}' must be a non-empty list of ids")
    for position, identifier in enumerate(ids):
        if isinstance(identifier, bool) or not isinstance(identifier, (str, int)):
            raise CommandError(f"'{kind}'[{position}] must be a string or integer id, got {identifier!r}")
    # JSON object keys are strings, so 1 and "1" would collide in the welfare map.
    as_keys = [str(identifier) for identifier in ids]
    if len(set(as_keys)) != len(as_keys):
        duplicates = sorted({key for key in as_keys if as_keys.count(key) > 1})
        raise CommandError(f"'{kind}' has duplicate id(s): {', '.join(duplicates)}")
    return ids


def _validate_scores(scores: Any, participants: list[Any], candidates: list[Any]) -> list[list[float]]:
    if not isinstance(scores, list):
        raise CommandError("'scores' must be a list with one list of scores per participant")
    if len(scores) != len(participants):
        raise CommandError(f"'scores' has {len(scores)} row(s) but there are {len(participants)} participant(s)")
    rows: list[list[float]] = []
    for p, row in enumerate(scores):
        if not isinstance(row, list):
            raise CommandError(f"scores[{p}] (participant {participants[p]}) must be a list of numbers")
        if len(row) != len(candidates):
            raise CommandError(
                f"scores[{p}] (participant {participants[p]}) has {len(row)} score(s) "
                f"but there are {len(candidates)} candidate(s)"
            )
        for c, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise CommandError(f"scores[{p}][{c}] is not a number: {value!r}")
        rows.append([float(value) for value in row])
    return rows


class Command(BaseCommand):
    help = "Rank candidates by a welfare function of per-participant agreement scores (no database needed)."
    # Pure computation: skip system checks so it runs without a configured database.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--method", choices=list(WELFARE_FUNCTIONS), default="utilitarian")
        parser.add_argument(
            "--alpha", type=float, default=1.0, help="Inequality aversion for --method isoelastic (>= 0)."
        )
        parser.add_argument("--tie-break", choices=list(TIE_BREAKS), default="index")
        parser.add_argument("--seed", type=int, default=0, help="Seed for the random and tbrc tie-breaks.")
        parser.add_argument("--input", required=True, help="JSON file: participants, candidates, scores.")
        parser.add_argument("--explain", action="store_true", help="Also print why the top candidate won.")

    def handle(self, *args: Any, **options: Any) -> None:
        data = _load_input(options["input"])
        participants = _validate_ids(data["participants"], "participants")
        candidates = _validate_ids(data["candidates"], "candidates")
        scores = _validate_scores(data["scores"], participants, candidates)
        try:
            result = rank_candidates(
                scores,
                method=options["method"],
                alpha=options["alpha"],
                tie_break=options["tie_break"],
                seed=options["seed"],
            )
        except ValueError as error:
            raise CommandError(str(error)) from error
        output: dict[str, Any] = {
            "ranking": [candidates[c] for c in result.ranking],
            "welfare": {str(candidates[c]): result.welfare[c] for c in range(len(candidates))},
        }
        if options["explain"]:
            explanation = describe_choice(
                scores, result, candidate_labels=candidates, participant_labels=participants
            ).as_dict()
            # Report candidates and participants by id rather than by position.
            explanation["winner"] = candidates[explanation["winner"]]
            if explanation["runner_up"] is not None:
                explanation["runner_up"] = candidates[explanation["runner_up"]]
            explanation["worst_off_participant"] = participants[explanation["worst_off_participant"]]
            output["explanation"] = explanation
        self.stdout.write(json.dumps(output))
