"""Experiments as files: experiment_apply creates or updates idempotently, experiment_dump writes the same
format back (a fixed point), errors name their line, and the permission rule applies."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from accounts.models import Collaboration
from deliberation.models import Arm, Experiment
from tests.factories import QuestionFactory

pytestmark = pytest.mark.django_db
EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "experiment.toml"


def _apply(path: Path, user) -> str:
    out = StringIO()
    call_command("experiment_apply", str(path), "--as-user", user.username, stdout=out)
    return out.getvalue()


def _dump(slug: str, user) -> str:
    out = StringIO()
    call_command("experiment_dump", slug, "--as-user", user.username, stdout=out)
    return out.getvalue()


def test_the_documented_example_applies_and_is_a_fixed_point(researcher, tmp_path: Path) -> None:
    assert "created (2 arm(s))" in _apply(EXAMPLE, researcher)
    experiment = Experiment.objects.get(slug="ranked-vs-mean")
    assert experiment.owner == researcher
    assert (experiment.question_split, experiment.attention_check, experiment.rate_opinions) == ("ood_test", True, False)
    assert experiment.consent_text.startswith("You will discuss a question")
    assert experiment.assignment_seed == 20261130 and experiment.max_wait_seconds == 600
    arms = {arm.name: arm for arm in experiment.arms.all()}
    assert (arms["schulze"].welfare_method, arms["schulze"].welfare_tie_break, arms["schulze"].n_candidates) == ("schulze", "tbrc", 8)
    assert arms["mean"].welfare_method == "utilitarian"
    # Applying again changes nothing.
    assert "unchanged" in _apply(EXAMPLE, researcher)
    assert Arm.objects.filter(experiment=experiment).count() == 2
    # dump -> apply -> dump is a fixed point.
    first = _dump("ranked-vs-mean", researcher)
    dumped = tmp_path / "dumped.toml"
    dumped.write_text(first)
    assert "unchanged" in _apply(dumped, researcher)
    assert _dump("ranked-vs-mean", researcher) == first


def test_a_file_updates_settings_arms_opponents_and_questions(researcher, tmp_path: Path) -> None:
    QuestionFactory(external_id="Q-1")
    QuestionFactory(external_id="Q-2")
    _apply(EXAMPLE, researcher)
    text = _dump("ranked-vs-mean", researcher)
    text = text.replace("opinion_seconds = 300", "opinion_seconds = 240").replace("questions = []", 'questions = ["Q-2", "Q-1"]')
    text = text.replace('compare_with = ""\n', 'compare_with = "mean"\n', 1)
    text += '\n[[arms]]\nname = "rawlsian"\nwelfare_method = "rawlsian"\n'
    changed = tmp_path / "changed.toml"
    changed.write_text(text)
    assert "updated (3 arm(s))" in _apply(changed, researcher)
    experiment = Experiment.objects.get(slug="ranked-vs-mean")
    assert experiment.opinion_seconds == 240
    assert sorted(experiment.questions.values_list("external_id", flat=True)) == ["Q-1", "Q-2"]
    arms = {arm.name: arm for arm in experiment.arms.all()}
    assert arms["schulze"].compare_with == arms["mean"] and arms["rawlsian"].welfare_method == "rawlsian"
    # An arm left out of the file (with no groups) is removed.
    changed.write_text(_dump("ranked-vs-mean", researcher).split("[[arms]]")[0] + "[[arms]]" + _dump("ranked-vs-mean", researcher).split("[[arms]]")[3])
    _apply(changed, researcher)
    assert list(experiment.arms.values_list("name", flat=True)) == ["rawlsian"]


@pytest.mark.parametrize(
    "replace, add, line, message",
    [
        ("group_size = 3", "group_size = 3\nslug_typo = 1", 15, "unknown key 'slug_typo'"),
        ("opinion_seconds = 300", "opinion_seconds = \"five minutes\"", 16, "opinion_seconds must be an integer"),
        ("group_size = 3", "group_size = 12", 14, "group_size"),
        ('welfare_method = "utilitarian"', 'welfare_method = "mean"', 45, "welfare_method"),
        ("k_shown = 4\n\n[[arms]]", 'k_shown = 4\ncompare_with = "nobody"\n\n[[arms]]', 42, "compare_with names no arm"),
        ("rate_opinions = false", "rate_opinions = nope", 34, "Invalid value"),
    ],
)
def test_bad_input_is_reported_with_its_line(researcher, tmp_path: Path, replace, add, line, message) -> None:
    text = EXAMPLE.read_text()
    assert replace in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(replace, add, 1))
    with pytest.raises(CommandError) as raised:
        _apply(bad, researcher)
    assert f"bad.toml: line {line}: " in str(raised.value), str(raised.value)
    assert message in str(raised.value)
    assert not Experiment.objects.filter(slug="ranked-vs-mean").exists()  # all or nothing


def test_only_the_owner_or_an_editor_may_change_an_experiment(researcher, outsider_researcher) -> None:
    _apply(EXAMPLE, researcher)
    with pytest.raises(CommandError, match="may not change experiment 'ranked-vs-mean'"):
        _apply(EXAMPLE, outsider_researcher)
    experiment = Experiment.objects.get(slug="ranked-vs-mean")
    Collaboration.objects.create(experiment=experiment, user=outsider_researcher, role=Collaboration.Role.VIEWER)
    with pytest.raises(CommandError, match="may not change"):
        _apply(EXAMPLE, outsider_researcher)
    Collaboration.objects.filter(experiment=experiment).update(role=Collaboration.Role.EDITOR)
    assert "unchanged" in _apply(EXAMPLE, outsider_researcher)
    assert Experiment.objects.get(slug="ranked-vs-mean").owner == researcher


def test_dump_shows_only_experiments_the_user_may_see(researcher, outsider_researcher) -> None:
    _apply(EXAMPLE, researcher)
    with pytest.raises(CommandError, match="that .* may see"):
        _dump("ranked-vs-mean", outsider_researcher)
    experiment = Experiment.objects.get(slug="ranked-vs-mean")
    Collaboration.objects.create(experiment=experiment, user=outsider_researcher, role=Collaboration.Role.VIEWER)
    assert 'slug = "ranked-vs-mean"' in _dump("ranked-vs-mean", outsider_researcher)
