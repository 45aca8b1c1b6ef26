"""build_sft_dataset and build_preference_dataset: what a study's groups rated, as training data that
train_generator and trl read; filters are counted, held-out questions never get in."""

from __future__ import annotations

import json
import re
from io import StringIO
from pathlib import Path

import pytest
from datasets import load_dataset
from django.core.management import CommandError, call_command

from deliberation.models import Candidate, Ranking, Rating, Room
from modeling.generation.prompts import TASK_INSTRUCTION
from modeling.training.sft import build_sft_examples, load_groups
from modeling.training.study_data import load_preference_pairs
from tests.factories import QuestionFactory
from tests.research.study import StudyFixture, build_study

pytestmark = pytest.mark.django_db


@pytest.fixture
def study(researcher) -> StudyFixture:
    study = build_study(owner=researcher)
    # One group answered a held-out question: nothing of it may become training data.
    held_out_room = Room.objects.filter(experiment=study.experiment).order_by("id").last()
    held_out_room.question = QuestionFactory(split="iid_test", external_id="held-out-q", text="Should cyclists pay road tax?")
    held_out_room.save()
    return study


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_sft_dataset_keeps_well_rated_statements_off_held_out_questions(study: StudyFixture, tmp_path: Path) -> None:
    # Vary quality: every statement's ratings become 6 or 2 by candidate id, so the filter has work to do.
    for rating in Rating.objects.all():
        rating.quality = 6 if rating.candidate_id % 2 else 2
        rating.save()
    out, stdout = tmp_path / "sft.jsonl", StringIO()
    call_command("build_sft_dataset", "--experiment", study.experiment.slug, "--min-quality", "5", "--out", str(out), stdout=stdout)
    report = stdout.getvalue()

    rated = Candidate.objects.filter(ratings__isnull=False).distinct()
    on_train = rated.exclude(round__room__question__split="iid_test")
    good = [c for c in on_train if c.pk % 2]
    assert "statements with ratings" in report and "question not in iid_test/ood_test" in report
    assert re.search(rf"mean quality >= 5\s+kept\s+{len(good)}\s+dropped\s+{on_train.count() - len(good)}\n", report)
    rows = _lines(out)
    assert sorted(row["candidate_id"] for row in rows) == sorted(c.pk for c in good) and rows
    assert {row["split"] for row in rows} == {"train"}
    assert all(row["mean_quality"] == 6 for row in rows)

    # train_generator's reader and prompt builder take the file; so does Hugging Face datasets.
    groups = load_groups([out])
    assert [g.statement for g in groups] == [row["statement"] for row in rows]
    example = build_sft_examples(groups, seed=0)[0]
    assert example.prompt_messages()[-1]["content"].endswith(TASK_INSTRUCTION)
    assert rows[0]["prompt"][-1]["content"].endswith(TASK_INSTRUCTION)
    loaded = load_dataset("json", data_files=str(out), split="train")
    assert loaded.num_rows == len(rows) and {"question", "opinions", "statement", "prompt", "completion"} <= set(loaded.column_names)


def test_the_welfare_filter_keeps_each_rounds_winner_by_the_raters_agreement(study: StudyFixture, tmp_path: Path) -> None:
    out, stdout = tmp_path / "sft.jsonl", StringIO()
    call_command("build_sft_dataset", "--min-quality", "1", "--welfare", "rawlsian", "--out", str(out), stdout=stdout)
    rows = _lines(out)
    assert "rawlsian welfare winner of its round" in stdout.getvalue()
    # Two train rounds: one winner each, and it has the highest minimum agreement of its round's statements.
    assert len({row["round_id"] for row in rows}) == len(rows) == 2
    for row in rows:
        candidates = Candidate.objects.filter(round_id=row["round_id"], ratings__isnull=False).distinct()
        raters = set(Rating.objects.filter(candidate_id=row["candidate_id"]).values_list("participant_id", flat=True))
        common = [c for c in candidates if raters <= set(c.ratings.values_list("participant_id", flat=True))]
        worst = {c.pk: min(c.ratings.values_list("agreement", flat=True)) for c in common}
        assert worst[row["candidate_id"]] == max(worst.values())


def test_nothing_kept_is_an_error_that_says_which_filter(study: StudyFixture, tmp_path: Path) -> None:
    Rating.objects.update(quality=3)
    with pytest.raises(CommandError, match=r"No statement was kept:(.|\n)*mean quality >= 5\s+kept\s+0\s"):
        call_command("build_sft_dataset", "--out", str(tmp_path / "none.jsonl"), stdout=StringIO())
    assert not (tmp_path / "none.jsonl").exists()
    with pytest.raises(CommandError, match="No experiment with slug nope"):
        call_command("build_sft_dataset", "--experiment", "nope", "--out", str(tmp_path / "x.jsonl"))


def test_preference_dataset_pairs_the_majoritys_choice_in_trls_format(study: StudyFixture, tmp_path: Path) -> None:
    out, stdout = tmp_path / "prefs.jsonl", StringIO()
    call_command("build_preference_dataset", "--experiment", study.experiment.slug, "--out", str(out), stdout=stdout)
    report = stdout.getvalue()
    rankings = Ranking.objects.filter(round__room__experiment=study.experiment)
    assert "votes from ranking" in report and "votes from head-to-head" in report
    rows = _lines(out)
    assert rows and {row["split"] for row in rows} == {"train"}
    held_out_ids = set(Candidate.objects.filter(round__room__question__split="iid_test").values_list("pk", flat=True))
    for row in rows:
        assert not {row["chosen_id"], row["rejected_id"]} & held_out_ids
        assert row["votes_chosen"] > row["votes_rejected"]
        # The rankers' own orders agree with the majority at least as often as they disagree.
        ranked = [r.order for r in rankings.filter(round_id=row["round_id"]) if row["chosen_id"] in r.order and row["rejected_id"] in r.order]
        ahead = sum(1 for order in ranked if order.index(row["chosen_id"]) < order.index(row["rejected_id"]))
        assert ahead * 2 >= len(ranked)
        assert row["chosen"][0]["content"] == Candidate.objects.get(pk=row["chosen_id"]).text
        assert row["prompt"][0]["role"] == "system" and row["prompt"][-1]["content"].endswith(TASK_INSTRUCTION)

    loaded = load_dataset("json", data_files=str(out), split="train")
    assert loaded.num_rows == len(rows) and {"prompt", "chosen", "rejected"} <= set(loaded.column_names)
    assert [p.chosen for p in load_preference_pairs(out)] == [row["chosen"][0]["content"] for row in rows]


def test_no_preferences_is_an_error(db, tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="No preference pair was kept"):
        call_command("build_preference_dataset", "--out", str(tmp_path / "p.jsonl"), stdout=StringIO())
    assert not (tmp_path / "p.jsonl").exists()
