"""docs/reliability.md is generated from the JUnit reports of a real run: check the generator."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import reliability_report

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="3">
  <testcase classname="tests.deliberation.test_faults" name="test_two_concurrent_identical_ratings_store_exactly_one" time="1.25"/>
  <testcase classname="tests.deliberation.test_faults"
            name="test_a_dropped_database_connection_gives_a_clean_error_and_the_retry_succeeds" time="0.50">
    <failure message="AssertionError: 500 != 503&#10;more detail">trace</failure>
  </testcase>
  <testcase classname="tests.modeling.test_welfare" name="test_made_up[rawls-2]" time="0.01">
    <skipped message="needs a GPU"/>
  </testcase>
</testsuite></testsuites>
"""


@pytest.fixture
def junit(tmp_path: Path) -> Path:
    path = tmp_path / "unit.xml"
    path.write_text(JUNIT)
    return path


def test_each_test_gets_a_row_with_what_it_does_and_what_happened(junit: Path) -> None:
    table = reliability_report.render(reliability_report._read_junit(junit), sources=[junit])

    assert "3 tests, 1 FAILED, 1 passed, 1 skipped" in table
    # Reliability suites come before the others.
    assert table.index("tests/deliberation/test_faults.py") < table.index("tests/modeling/test_welfare.py")
    assert "| `test_two_concurrent_identical_ratings_store_exactly_one` |" in table
    assert "| passed, 1.2 s |" in table or "| passed, 1.3 s |" in table
    # Only the first line of a failure message, so the table stays one row per test.
    assert "FAILED, 0.5 s: AssertionError: 500 != 503 |" in table
    # Without a docstring (or a file to read it from), the name is read as a sentence.
    assert "| Made up [rawls-2] | skipped, 0.0 s: needs a GPU |" in table


def test_main_replaces_only_the_generated_part(junit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = tmp_path / "reliability.md"
    doc.write_text(f"# Reliability\n\nHand-written.\n\n{reliability_report.GENERATED_BEGIN}\nold table\n{reliability_report.GENERATED_END}\n\nAfter.\n")
    monkeypatch.setattr(reliability_report, "DOC_PATH", doc)

    assert reliability_report.main([str(junit)]) == 0
    text = doc.read_text()
    assert "Hand-written." in text and "After." in text and "old table" not in text
    assert "test_two_concurrent_identical_ratings_store_exactly_one" in text


def test_a_missing_report_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert reliability_report.main([str(tmp_path / "absent.xml")]) == 2
    assert "run `make test` first" in capsys.readouterr().err
