"""The 7-point agreement scale every rating, prediction and welfare function uses: one definition."""

from __future__ import annotations

LIKERT_MIN = 1
LIKERT_MAX = 7
LIKERT_MIDPOINT = (LIKERT_MIN + LIKERT_MAX) / 2
LIKERT_POINTS = tuple(range(LIKERT_MIN, LIKERT_MAX + 1))
AGREEMENT_LABELS: dict[int, str] = {
    1: "Strongly disagree",
    2: "Disagree",
    3: "Somewhat disagree",
    4: "Neither agree nor disagree",
    5: "Somewhat agree",
    6: "Agree",
    7: "Strongly agree",
}
# For data dictionaries: the scale in one line.
AGREEMENT_SCALE_TEXT = "7-point agreement: " + ", ".join(f"{point} {label.lower()}" for point, label in AGREEMENT_LABELS.items()) + "."


def parse_likert(value: object) -> int | None:
    """The point a form sent, or None when it is not a whole number on the scale."""
    try:
        number = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return number if LIKERT_MIN <= number <= LIKERT_MAX else None


def in_range(value: float) -> bool:
    return LIKERT_MIN <= value <= LIKERT_MAX
