"""`manage.py rank_candidates`: JSON in, ranking out, no database."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

SCORES = {"participants": ["p1", "p2", "p3"], "candidates": [11, 12, 13], "scores": [[1, 7, 4], [2, 6, 4], [7, 1, 4.5]]}


def run(tmp_path: Path, payload: object, *args: str) -> dict:
    path = tmp_path / "scores.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    out = StringIO()
    call_command("rank_candidates", "--input", str(path), *args, stdout=out)
    return json.loads(out.getvalue())


@pytest.mark.parametrize(
    "method, expected",
    [
        ("utilitarian", [12, 13, 11]),
        ("rawlsian", [13, 11, 12]),
        ("nash", [13, 12, 11]),
        ("borda", [12, 13, 11]),
        ("schulze", [12, 13, 11]),
    ],
)
def test_ranks_by_each_method(tmp_path, method, expected):
    output = run(tmp_path, SCORES, "--method", method)
    assert output["ranking"] == expected
    assert set(output["welfare"]) == {"11", "12", "13"}


def test_isoelastic_alpha_and_welfare_values(tmp_path):
    output = run(tmp_path, SCORES, "--method", "isoelastic", "--alpha", "2")
    # Harmonic means of each candidate's column.
    assert output["welfare"]["11"] == pytest.approx(3 / (1 + 1 / 2 + 1 / 7))
    assert output["ranking"][0] == 13
    zero = run(tmp_path, SCORES, "--method", "isoelastic", "--alpha", "0")
    assert zero["ranking"] == run(tmp_path, SCORES, "--method", "utilitarian")["ranking"]


def test_tie_break_options(tmp_path):
    tied = {"participants": [1], "candidates": ["a", "b"], "scores": [[4, 4]]}
    assert run(tmp_path, tied)["ranking"] == ["a", "b"]
    picks = {run(tmp_path, tied, "--tie-break", "random", "--seed", str(seed))["ranking"][0] for seed in range(20)}
    assert picks == {"a", "b"}


def test_explain_reports_ids(tmp_path):
    output = run(tmp_path, SCORES, "--method", "utilitarian", "--explain")
    assert output["explanation"]["winner"] == 12
    assert output["explanation"]["worst_off_participant"] == "p3"
    assert "Candidate 12" in output["explanation"]["text"]


@pytest.mark.parametrize(
    "payload, message",
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "JSON object"),
        ({"participants": [1], "scores": [[1]]}, "missing key.*candidates"),
        ({**SCORES, "scores": [[1, 7, 4], [2, 6, 4]]}, "2 row.*3 participant"),
        ({**SCORES, "scores": [[1, 7, 4], [2, 6], [7, 1, 4.5]]}, r"scores\[1\].*2 score.*3 candidate"),
        ({**SCORES, "scores": [[1, 7, 4], [2, "six", 4], [7, 1, 4.5]]}, r"scores\[1\]\[1\] is not a number"),
        ({**SCORES, "scores": [[1, 7, 4], [2, None, 4], [7, 1, 4.5]]}, "not a number"),
        ({**SCORES, "candidates": [11, 11, 13]}, "duplicate"),
        ({**SCORES, "candidates": []}, "non-empty"),
        ({**SCORES, "scores": "1,2,3"}, "one list of scores per participant"),
    ],
)
def test_malformed_input_is_a_command_error(tmp_path, payload, message):
    with pytest.raises(CommandError, match=message):
        run(tmp_path, payload)


def test_invalid_scores_for_the_method_are_a_command_error(tmp_path):
    with pytest.raises(CommandError, match="positive scores"):
        run(tmp_path, {**SCORES, "scores": [[0, 7, 4], [2, 6, 4], [7, 1, 4.5]]}, "--method", "nash")
    with pytest.raises(CommandError, match="alpha must be >= 0"):
        run(tmp_path, SCORES, "--method", "isoelastic", "--alpha", "-1")


def test_unreadable_file_is_a_command_error(tmp_path):
    with pytest.raises(CommandError, match="cannot read"):
        call_command("rank_candidates", "--input", str(tmp_path / "missing.json"), stdout=StringIO())
