"""Experiments as files: an experiment, its protocol switches and its arms as one TOML document.

`experiment_apply` creates or updates an experiment from a document, idempotently (applying the same
file twice changes nothing); `experiment_document` reads one back in the same shape, so
dump -> apply -> dump is a fixed point. Errors name the line of the file they are about: tomllib
gives positions for syntax errors, and schema errors are traced to the line of their key.

The document:

    [experiment]        slug, name and every setting (timers, group sizes, question filters, consent text, ...)
    questions = [...]   (inside [experiment]) external ids of the attached questions (empty: draw from the bank)
    [protocols]         attention_check, rate_opinions (the experiment-wide protocol switches)
    [[arms]]            one table per arm, matched by name; compare_with names another arm

Fine-tuned generator and reward-model versions are pinned in the admin; a file leaves them as they are.
Permissions follow accounts.permissions: a new experiment is owned by the user who applies it; changing
an existing one needs its owner, an editor or a superuser.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from typing import Any

import tomli_w
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import transaction

from accounts import permissions
from deliberation.models import Arm, Experiment, Question

# Fields a file sets, in the order a dump writes them. Anything else is an error.
EXPERIMENT_FIELDS = [
    "slug", "name", "description", "status", "consent_text", "group_size", "min_group_size", "opinion_seconds",
    "rating_seconds", "max_wait_seconds", "opinion_min_chars", "opinion_max_chars", "question_split", "question_topic",
    "require_allow_list", "allow_several_seats_per_browser", "completion_code", "completion_url", "release_code",
    "assignment_seed",
]
PROTOCOL_FIELDS = ["attention_check", "rate_opinions"]
ARM_FIELDS = [
    "name", "generator_backend", "generator_model", "reward_model", "welfare_method", "welfare_alpha", "welfare_tie_break",
    "n_candidates", "k_shown", "weight", "exclude_one_opinion", "compare_with",
]
_FLOAT_FIELDS = {"welfare_alpha"}


class ExperimentFileError(Exception):
    """A problem with the file, with the line it is on (None when it concerns the whole file)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line


@dataclass
class ApplyOutcome:
    experiment: Experiment
    created: bool
    changed: bool


# --- locating keys --------------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")


def line_of(text: str, section: str, key: str | None = None, index: int = 0) -> int | None:
    """1-based line of `key` in table `section` (the index-th `[[section]]` for an array of tables), or of the header."""
    seen = -1
    inside = section == ""
    header_line: int | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            name = header.group(2).strip()
            if name == section:
                seen += 1
                inside = seen == index
                if inside:
                    header_line = number
            else:
                inside = False
            continue
        if inside and key is not None and re.match(rf"^\s*\"?{re.escape(key)}\"?\s*=", line):
            return number
    return header_line


# --- reading --------------------------------------------------------------------------------------


def _parse(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        # Python 3.11's message ends "(at line L, column C)"; keep the message, lead with the line.
        found = re.search(r"at line (\d+), column (\d+)", str(error))
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(error))
        if found:
            raise ExperimentFileError(f"{message} (column {found.group(2)})", int(found.group(1))) from None
        raise ExperimentFileError(f"not valid TOML: {error}") from None


def _check_keys(text: str, table: dict[str, Any], allowed: list[str], section: str, index: int = 0) -> None:
    for key in table:
        if key not in allowed:
            raise ExperimentFileError(
                f"unknown key {key!r} in [{section}]; known keys: {', '.join(allowed)}", line_of(text, section, key, index)
            )


def _type_check(text: str, values: dict[str, Any], model: type[Experiment] | type[Arm], section: str, index: int = 0) -> None:
    """Catch wrong types before Django coerces them ("3" for an integer would silently pass)."""
    for key, value in values.items():
        if key in ("questions", "compare_with"):
            continue
        field = model._meta.get_field(key)
        internal = field.get_internal_type()
        if internal == "BooleanField":
            ok = isinstance(value, bool)
        elif internal in ("FloatField",):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif "Integer" in internal:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            wanted = {"BooleanField": "true or false", "FloatField": "a number"}.get(internal, "an integer" if "Integer" in internal else "a string")
            raise ExperimentFileError(f"{key} must be {wanted}, got {value!r}", line_of(text, section, key, index))


def _validation_error(text: str, error: ValidationError, section: str, index: int = 0) -> ExperimentFileError:
    if hasattr(error, "error_dict"):
        key, messages = next(iter(error.message_dict.items()))
        line = line_of(text, section, key, index) if key != "__all__" else line_of(text, section, None, index)
        return ExperimentFileError(f"{key}: {' '.join(messages)}", line)
    return ExperimentFileError(" ".join(error.messages), line_of(text, section, None, index))


# --- applying -------------------------------------------------------------------------------------


def experiment_apply(*, text: str, user: User) -> ApplyOutcome:
    """Create or update the experiment the TOML `text` describes, with its protocols and arms (all or nothing)."""
    document = _parse(text)
    _check_keys(text, document, ["experiment", "protocols", "arms"], "")
    settings_ = dict(document.get("experiment") or {})
    if not settings_:
        raise ExperimentFileError("the file needs an [experiment] table with at least slug and name")
    protocols = dict(document.get("protocols") or {})
    arms = list(document.get("arms") or [])
    _check_keys(text, settings_, [*EXPERIMENT_FIELDS, "questions"], "experiment")
    _check_keys(text, protocols, PROTOCOL_FIELDS, "protocols")
    for index, arm in enumerate(arms):
        _check_keys(text, arm, ARM_FIELDS, "arms", index)
        if "name" not in arm:
            raise ExperimentFileError("every [[arms]] needs a name", line_of(text, "arms", None, index))
    for key in ("slug", "name"):
        if key not in settings_:
            raise ExperimentFileError(f"[experiment] needs {key}", line_of(text, "experiment"))
    _type_check(text, {k: v for k, v in settings_.items()}, Experiment, "experiment")
    _type_check(text, protocols, Experiment, "protocols")
    for index, arm in enumerate(arms):
        _type_check(text, arm, Arm, "arms", index)
    names = [arm["name"] for arm in arms]
    for index, name in enumerate(names):
        if names.index(name) != index:
            raise ExperimentFileError(f"two arms are named {name!r}", line_of(text, "arms", "name", index))
    if not arms:
        raise ExperimentFileError("the file needs at least one [[arms]] table")

    with transaction.atomic():
        experiment = Experiment.objects.select_for_update().filter(slug=settings_["slug"]).first()
        created = experiment is None
        if experiment is None:
            experiment = Experiment(owner=user)
        elif not permissions.can_change_experiment(user, experiment):
            # Same answer as the site gives: another researcher's experiment is not theirs to change.
            raise ExperimentFileError(
                f"{user} may not change experiment {experiment.slug!r}: only its owner, an editor or a superuser may",
                line_of(text, "experiment", "slug"),
            )
        before = "" if created else dump_text(experiment)
        question_ids = settings_.pop("questions", [])
        if not isinstance(question_ids, list) or not all(isinstance(q, str) for q in question_ids):
            raise ExperimentFileError("questions must be a list of question ids", line_of(text, "experiment", "questions"))
        for key, value in {**settings_, **protocols}.items():
            setattr(experiment, key, value)
        try:
            experiment.full_clean()
        except ValidationError as error:
            section = "protocols" if hasattr(error, "error_dict") and set(error.message_dict) <= set(PROTOCOL_FIELDS) else "experiment"
            raise _validation_error(text, error, section) from None
        experiment.save()
        questions = list(Question.objects.filter(external_id__in=question_ids))
        missing = sorted(set(question_ids) - {q.external_id for q in questions})
        if missing:
            raise ExperimentFileError(f"no question with the id(s) {', '.join(missing)}", line_of(text, "experiment", "questions"))
        experiment.questions.set(questions)
        _apply_arms(text=text, experiment=experiment, arms=arms)
        after = dump_text(experiment)
    return ApplyOutcome(experiment=experiment, created=created, changed=created or before != after)


def _apply_arms(*, text: str, experiment: Experiment, arms: list[dict[str, Any]]) -> None:
    # Opponents are set again below; clearing them first lets an arm that is no longer in the file go.
    experiment.arms.update(compare_with=None)
    existing = {arm.name: arm for arm in experiment.arms.all()}
    wanted = {arm["name"] for arm in arms}
    for name, arm in existing.items():
        if name not in wanted:
            if arm.rooms.exists() or arm.sourced_candidates.exists():
                raise ExperimentFileError(f"arm {name!r} is not in the file but has groups; it cannot be removed (set its weight to 0)")
            arm.delete()
    stored: dict[str, Arm] = {}
    # First every arm without its opponent (which may come later in the file), then the opponents.
    for index, values in enumerate(arms):
        arm = existing.get(values["name"]) or Arm(experiment=experiment)
        for key, value in values.items():
            if key != "compare_with":
                setattr(arm, key, float(value) if key in _FLOAT_FIELDS else value)
        arm.compare_with = None
        try:
            arm.full_clean(exclude=["compare_with"], validate_unique=False)
        except ValidationError as error:
            raise _validation_error(text, error, "arms", index) from None
        arm.save()
        stored[arm.name] = arm
    for index, values in enumerate(arms):
        opponent = values.get("compare_with", "")
        if not opponent:
            continue
        arm = stored[values["name"]]
        if opponent not in stored:
            raise ExperimentFileError(f"compare_with names no arm of this file: {opponent!r}", line_of(text, "arms", "compare_with", index))
        arm.compare_with = stored[opponent]
        try:
            arm.full_clean(validate_unique=False)
        except ValidationError as error:
            raise _validation_error(text, error, "arms", index) from None
        arm.save(update_fields=["compare_with"])


# --- dumping --------------------------------------------------------------------------------------


def experiment_document(experiment: Experiment) -> dict[str, Any]:
    """The experiment as the document experiment_apply reads (fields in a fixed order)."""
    settings_: dict[str, Any] = {key: getattr(experiment, key) for key in EXPERIMENT_FIELDS}
    settings_["questions"] = sorted(experiment.questions.values_list("external_id", flat=True))
    arms = []
    for arm in experiment.arms.order_by("id").select_related("compare_with"):
        values: dict[str, Any] = {key: getattr(arm, key) for key in ARM_FIELDS if key != "compare_with"}
        values["compare_with"] = arm.compare_with.name if arm.compare_with else ""
        arms.append(values)
    return {
        "experiment": settings_,
        "protocols": {key: getattr(experiment, key) for key in PROTOCOL_FIELDS},
        "arms": arms,
    }


def dump_text(experiment: Experiment) -> str:
    return tomli_w.dumps(experiment_document(experiment), multiline_strings=True)
