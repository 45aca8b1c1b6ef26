"""Dataset exports: every table of an experiment, streamed to CSV, JSON lines or Parquet, in one zip.

Each table is declared once (`TABLES`): its columns, with their types and descriptions, and a
generator of its rows. The same declaration writes the rows, the README.md data dictionary and the
Frictionless `datapackage.json`, so a column cannot be exported without being documented.

Rows are read with `QuerySet.iterator(chunk_size=...)` and written as they come: memory stays flat
however large the study. Files are written in a scratch folder and the zip is moved into place only
when complete, so a crashed or redelivered export never leaves a partial zip behind.

Participants are pseudonymised: every participant id in every table is a keyed hash of the
experiment and the database id (stable across exports of one experiment, meaningless outside it).
External ids (e.g. Prolific PIDs) appear only when the export asked for them.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import logging
import os
import shutil
import subprocess
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from deliberation.inputs import clean_text
from deliberation.models import (
    Arm,
    AttentionCheck,
    Candidate,
    Experiment,
    FinalPreference,
    Opinion,
    OpinionRating,
    PageView,
    PairwisePreference,
    Participant,
    Position,
    PredictedAgreement,
    Presentation,
    Question,
    Ranking,
    Rating,
    Release,
    RoomAssignment,
    Round,
)
from modeling.likert import AGREEMENT_SCALE_TEXT
from modeling.welfare import WELFARE_METHODS

from . import export_lineage, services
from .models import DatasetExport

logger = logging.getLogger(__name__)

CHUNK_SIZE = 2000
HM_CREDIT = (
    "Questions from the Habermas Machine question bank (google-deepmind/habermas_machine), "
    "© 2024 DeepMind Technologies Limited, licensed CC-BY-4.0 (https://creativecommons.org/licenses/by/4.0/)."
)

ProgressCallback = Callable[[str, int, int], None]  # (table, rows done overall, rows in total)


# --- Declarations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # a Frictionless field type: integer, number, string, boolean, datetime
    description: str


@dataclass
class ExportContext:
    experiment: Experiment
    include_external_ids: bool
    chunk_size: int = CHUNK_SIZE
    _key: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._key = hashlib.sha256(f"{settings.SECRET_KEY}:export:{self.experiment.pk}".encode()).digest()

    def pseudonym(self, participant_id: int | None) -> str | None:
        """A participant's id in the dataset: a keyed hash, stable within this experiment."""
        if participant_id is None:
            return None
        return "p" + hmac.new(self._key, str(participant_id).encode(), hashlib.sha256).hexdigest()[:12]


@dataclass(frozen=True)
class Reference:
    """A foreign key: `fields` of this table hold values of `reference_fields` in table `resource`."""

    fields: tuple[str, ...]
    resource: str
    reference_fields: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    name: str
    description: str
    columns: Callable[[ExportContext], Sequence[Column]]
    rows: Callable[[ExportContext], Iterator[tuple[Any, ...]]]
    count: Callable[[ExportContext], int]
    # Declared in datapackage.json (Frictionless checks them) and in the README.
    primary_key: tuple[str, ...] = ()
    foreign_keys: tuple[Reference, ...] = ()


def _refs(*pairs: tuple[str, str]) -> tuple[Reference, ...]:
    """Foreign keys given as (column, "table.column")."""
    return tuple(Reference((column, ), target.split(".")[0], (target.split(".")[1], )) for column, target in pairs)


# --- Provenance and privacy ---------------------------------------------------------------------


def code_version() -> str:
    """The software that wrote the export: CONCORD_CODE_VERSION if set, else the git commit, else "unknown".

    A checkout with uncommitted changes is marked "-dirty": its commit alone does not say what ran.
    """
    if settings.CONCORD_CODE_VERSION:
        return settings.CONCORD_CODE_VERSION
    try:
        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=settings.BASE_DIR, capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "") if commit else "unknown"


PSEUDONYM_KEY_WARNING = (
    "This site runs without its own SECRET_KEY: it uses the demo's fixed fallback key, which is public "
    "(config/settings.py). Participant pseudonyms are a keyed hash of the experiment and each participant's "
    "database id, and database ids are small consecutive numbers, so anyone holding this export can recompute "
    "the hash for every id and map each pseudonym back to its database row. Do not share this export as "
    "pseudonymised data: set SECRET_KEY to a long random secret and export again."
)


def pseudonyms_reversible() -> bool:
    """True when pseudonyms are keyed with the public fallback key, so they can be reversed."""
    return settings.SECRET_KEY == settings.INSECURE_FALLBACK_SECRET_KEY


def _iterate(queryset: QuerySet, ctx: ExportContext, *fields: str) -> Iterator[tuple[Any, ...]]:
    return queryset.values_list(*fields).iterator(chunk_size=ctx.chunk_size)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


P = "Pseudonymous participant id (a keyed hash, stable within this experiment; see participants.participant_id)."


# experiment ------------------------------------------------------------------------------------

# (column, type, description) of the experiment's own settings, read straight from Experiment.
_EXPERIMENT_SETTINGS: list[tuple[str, str, str]] = [
    ("slug", "string", "The experiment's slug (its id in URLs and in experiment files)."),
    ("name", "string", "Name chosen by the researcher."),
    ("description", "string", "Description written by the researcher."),
    ("status", "string", "active, paused or closed, at export."),
    ("created_at", "datetime", "When the experiment was created, UTC."),
    ("consent_text", "string", "The consent text participants agreed to before joining."),
    ("group_size", "integer", "Participants per group."),
    ("min_group_size", "integer", "Fewest participants a group may start with after the maximum wait."),
    ("opinion_seconds", "integer", "Timer of the opinion phase, seconds."),
    ("rating_seconds", "integer", "Timer of the rating phase, seconds."),
    ("max_wait_seconds", "integer", "Longest wait for a group to fill, seconds (0: wait for a full group)."),
    ("opinion_min_chars", "integer", "Shortest opinion accepted, characters."),
    ("opinion_max_chars", "integer", "Longest opinion accepted, characters."),
    ("question_split", "string", "Question filter: draw only questions of this split (blank: any)."),
    ("question_topic", "string", "Question filter: draw only questions of this topic (blank: any)."),
    ("require_allow_list", "boolean", "Only external ids on the allow-list could join."),
    ("allow_several_seats_per_browser", "boolean", "One browser could hold several seats (demos only)."),
    ("attention_check", "boolean", "Protocol switch: an instructed-response item on the rating page."),
    ("rate_opinions", "boolean", "Protocol switch: participants also rated the other members' opinions (best-human-opinion protocol)."),
    ("assignment_seed", "integer", "Seed of the balanced arm assignment draw."),
    ("completion_url", "string", "Where finished participants were sent (e.g. the panel's completion link)."),
]


def _experiment_rows(ctx: ExportContext) -> Iterator[tuple[Any, ...]]:
    e = ctx.experiment
    yield (
        *(getattr(e, name) for name, _, _ in _EXPERIMENT_SETTINGS),
        e.questions.count(),
        code_version(),
        settings.CONCORD_GENERATOR_BACKEND,
        settings.CONCORD_GENERATOR_MODEL,
        settings.CONCORD_GENERATOR_ADAPTER,
        settings.CONCORD_REWARD_MODEL,
        settings.CONCORD_MAX_NEW_TOKENS,
        not pseudonyms_reversible(),
    )


EXPERIMENT = Table(
    name="experiment",
    description="One row: the experiment's settings (timers, protocol switches, question filters, consent text), "
    "the software version that exported it and the site's defaults that blank arm settings fall back to.",
    columns=lambda ctx: [
        *(Column(name, type_, description) for name, type_, description in _EXPERIMENT_SETTINGS),
        Column("n_questions_attached", "integer", "Questions attached to the experiment (0: drawn from the whole bank, narrowed by the filters)."),
        Column("code_version", "string", "Concord's version at export: the git commit (\"-dirty\": with uncommitted changes), the CONCORD_CODE_VERSION a deployment set, or \"unknown\"."),
        Column("site_generator_backend", "string", "Site default generator backend at export (arms with a blank backend used the default at the time; candidates.backend records what ran)."),
        Column("site_generator_model", "string", "Site default generator model at export (candidates.model_id records what ran)."),
        Column("site_generator_adapter", "string", "Site default fine-tuned adapter at export (candidates.generator_version records what ran)."),
        Column("site_reward_model", "string", "Site default reward model at export (predicted_agreement.reward_model records what ran)."),
        Column("site_max_new_tokens", "integer", "Site token budget per statement at export (candidates.max_new_tokens records what ran)."),
        Column("pseudonyms_keyed_with_site_secret", "boolean", "false: the site used the public fallback SECRET_KEY, so pseudonyms can be reversed (see README)."),
    ],
    rows=_experiment_rows,
    count=lambda ctx: 1,
    primary_key=("slug",),
)


# questions -------------------------------------------------------------------------------------


def _questions(ctx: ExportContext) -> QuerySet[Question]:
    e = ctx.experiment
    return Question.objects.filter(Q(experiments=e) | Q(rooms__experiment=e)).distinct().order_by("id")


QUESTIONS = Table(
    name="questions",
    description="Questions the experiment could draw or did use (attached to it, or discussed in one of its groups).",
    columns=lambda ctx: [
        Column("question_id", "string", "Question id in its bank (the Habermas Machine bank id, e.g. S173963710)."),
        Column("text", "string", "The question as shown to participants."),
        Column("affirming_statement", "string", "A statement answering the question in the affirmative."),
        Column("negating_statement", "string", "A statement answering the question in the negative."),
        Column("topic", "string", "Topic of the question in its bank."),
        Column("split", "string", "Split of the question in its bank: train, iid_test or ood_test for the Habermas Machine bank."),
        Column("source", "string", "Where the question came from (bank and licence)."),
    ],
    rows=lambda ctx: _iterate(_questions(ctx), ctx, "external_id", "text", "affirming_statement", "negating_statement", "topic", "split", "source"),
    count=lambda ctx: _questions(ctx).count(),
    primary_key=("question_id",),
)


# arms and groups ------------------------------------------------------------------------------


ARMS = Table(
    name="arms",
    description="Conditions of the experiment: which generator, reward model and welfare function wrote and chose statements.",
    columns=lambda ctx: [
        Column("arm_id", "integer", "Arm id."),
        Column("name", "string", "Arm name chosen by the researcher."),
        Column("generator_backend", "string", "Generator backend (blank: the site default at the time; candidates.backend records what ran)."),
        Column("generator_model", "string", "Generator model (blank: the site default; candidates.model_id records what ran)."),
        Column("reward_model", "string", "Reward model registry name (blank: the site default; predicted_agreement.reward_model records what ran)."),
        Column("reward_model_version_id", "integer", "Registered reward model version, if pinned."),
        Column("welfare_method", "string", "Welfare function ranking the candidates: " + ", ".join(WELFARE_METHODS) + " (schulze: the Habermas Machine's level order; schulze_wins: by candidates beaten; docs/welfare.md)."),
        Column("welfare_alpha", "number", "Inequality aversion α of the isoelastic welfare function."),
        Column("welfare_tie_break", "string", "How exact welfare ties were broken: index (lower index first), random or tbrc, both seeded by the round's seed."),
        Column("n_candidates", "integer", "N: candidate statements written per round."),
        Column("k_shown", "integer", "K: statements shown to each participant."),
        Column("weight", "integer", "Relative share of groups assigned to the arm (0: never assigned; used only as a head-to-head opponent)."),
        Column("compare_with_arm_id", "integer", "Head-to-head protocol: the arm whose configuration also writes statements in this arm's rounds."),
        Column("exclude_one_opinion", "boolean", "Exclusion protocol: one member's opinion is silently left out of generation and ranking."),
    ],
    rows=lambda ctx: _iterate(
        Arm.objects.filter(experiment=ctx.experiment).order_by("id"), ctx,
        "id", "name", "generator_backend", "generator_model", "reward_model", "reward_model_version_id", "welfare_method",
        "welfare_alpha", "welfare_tie_break", "n_candidates", "k_shown", "weight", "compare_with_id", "exclude_one_opinion",
    ),
    count=lambda ctx: Arm.objects.filter(experiment=ctx.experiment).count(),
    primary_key=("arm_id",),
    foreign_keys=_refs(("compare_with_arm_id", "arms.arm_id")),
)


def _rounds(ctx: ExportContext) -> QuerySet[Round]:
    return Round.objects.filter(room__experiment=ctx.experiment).order_by("room_id", "index")


def _group_rows(ctx: ExportContext) -> Iterator[tuple[Any, ...]]:
    assignments = {
        a.room_id: a for a in RoomAssignment.objects.filter(room__experiment=ctx.experiment).iterator(chunk_size=ctx.chunk_size)
    }
    queryset = _rounds(ctx).annotate(members=Count("room__participants"))
    for row in _iterate(
        queryset, ctx,
        "room_id", "pk", "index", "room__arm_id", "room__question__external_id", "room__status", "room__capacity", "members",
        "room__created_at", "room__started_at", "room__closed_at", "phase", "outcome", "seed", "excluded_participant_id",
        "opinions_started_at", "mediation_started_at", "rating_started_at", "finished_at", "mediation_attempts",
    ):
        assignment = assignments.get(row[0])
        yield (
            *row[:14],
            ctx.pseudonym(row[14]),
            *row[15:],
            assignment.method if assignment else None,
            assignment.seed if assignment else None,
            assignment.ordinal if assignment else None,
            _json(assignment.tied_arm_ids) if assignment else None,
        )


GROUPS = Table(
    name="groups",
    description="One row per round of each group (room), with its arm, question, phase timestamps and arm assignment.",
    columns=lambda ctx: [
        Column("group_id", "integer", "Group (room) id."),
        Column("round_id", "integer", "Round id."),
        Column("round_index", "integer", "Round number within the group (0: the opinion round)."),
        Column("arm_id", "integer", "Arm the group was assigned to (see arms)."),
        Column("question_id", "string", "Question discussed (see questions)."),
        Column("room_status", "string", "open, running or closed."),
        Column("capacity", "integer", "Group size the room was formed for."),
        Column("n_participants", "integer", "Participants who joined the group (may be below capacity after the maximum wait)."),
        Column("created_at", "datetime", "When the room opened (first arrival), UTC."),
        Column("started_at", "datetime", "When the discussion started (group full, maximum wait, or a researcher's start), UTC."),
        Column("closed_at", "datetime", "When the room closed, UTC."),
        Column("phase", "string", "Phase of the round at export: waiting, opinions, mediating, rating or done."),
        Column("outcome", "string", "completed, abandoned (too few opinions, or released after the maximum wait), failed (mediation failed), or blank (still running)."),
        Column("seed", "integer", "Round seed: generation seeds and per-participant presentation orders derive from it."),
        Column("excluded_participant_id", "string", "Exclusion protocol: whose opinion was left out of generation and ranking. " + P),
        Column("opinions_started_at", "datetime", "Start of the opinion phase, UTC."),
        Column("mediation_started_at", "datetime", "Start of mediation (generation and ranking), UTC."),
        Column("rating_started_at", "datetime", "Start of the rating phase (statements shown), UTC."),
        Column("finished_at", "datetime", "End of the round, UTC."),
        Column("mediation_attempts", "integer", "Mediation attempts (more than 1: retried after an error)."),
        Column("assignment_method", "string", "balanced: drawn by the balanced seeded assignment; given: chosen by a researcher."),
        Column("assignment_seed", "integer", "Experiment seed the arm draw used."),
        Column("assignment_ordinal", "integer", "Rooms of the experiment created before this one (the draw's index)."),
        Column("assignment_tied_arm_ids", "string", "JSON array: arms tied for the fewest (weighted) rooms, among which the seeded draw chose."),
    ],
    rows=_group_rows,
    count=lambda ctx: _rounds(ctx).count(),
    primary_key=("round_id",),
    foreign_keys=_refs(("arm_id", "arms.arm_id"), ("question_id", "questions.question_id"), ("excluded_participant_id", "participants.participant_id")),
)


# participants ------------------------------------------------------------------------------------


def _participants(ctx: ExportContext) -> QuerySet[Participant]:
    return Participant.objects.filter(room__experiment=ctx.experiment).order_by("id")


def _participant_columns(ctx: ExportContext) -> list[Column]:
    columns = [
        Column("participant_id", "string", P),
        Column("group_id", "integer", "Group (room) the participant joined."),
        Column("label", "string", "Anonymous name other members saw (e.g. Participant A)."),
    ]
    if ctx.include_external_ids:
        columns.append(Column("external_id", "string", "External id from the recruitment panel (e.g. Prolific PID). Personal data: exported only on request."))
    return columns + [
        Column("joined_at", "datetime", "When the participant joined (after consenting), UTC."),
        Column("consented_at", "datetime", "When consent was given, UTC."),
        Column("finished_at", "datetime", "When the participant submitted the final ranking, UTC."),
        Column("dropped_out_at", "datetime", "When the participant was recorded as having dropped out (a phase deadline passed), UTC."),
        Column("dropout_reason", "string", "Why the participant was recorded as dropped out."),
        Column(
            "closing_missed_at", "datetime",
            "Habermas Machine protocol: when the closing questions' timer ran out before this member answered them (blank: answered, "
            "or not asked). They took part to the end of the discussion; final preference and position after are missing.",
        ),
        Column("released_at", "datetime", "When the participant was released without a group after the maximum wait, UTC."),
        Column(
            "completion_status", "string",
            "Which code the participant was given: completed (the completion code: they finished, or their group's round ended while "
            "they were still in it), closing_missed (the partial code: they took part to the end but the closing questions' timer ran "
            "out first), dropped (no code: recorded as dropped out), released (the release code) or incomplete (no code yet, e.g. "
            "still answering the closing questions).",
        ),
        Column("attention_check_passed", "boolean", "Result of the attention check (blank: none asked or not answered)."),
        Column("excluded_from_generation", "boolean", "Exclusion protocol: this participant's opinion was left out of generation and ranking."),
        Column(
            "researcher_seat", "boolean",
            "Researcher-mediated arm: this row is not a member but the seat a researcher wrote the group statement from "
            "(the round's human_mediator_id); leave it out of analyses of members.",
        ),
    ]


def _participant_rows(ctx: ExportContext) -> Iterator[tuple[Any, ...]]:
    experiment = ctx.experiment
    released = dict(Release.objects.filter(participant__room__experiment=experiment).values_list("participant_id", "created_at"))
    attention = dict(AttentionCheck.objects.filter(participant__room__experiment=experiment).values_list("participant_id", "passed"))
    excluded = set(Round.objects.filter(room__experiment=experiment).exclude(excluded_participant=None).values_list("excluded_participant_id", flat=True))
    # Each room's latest round (a later index overwrites an earlier one): is it done?
    latest: dict[int, tuple[int, str]] = {
        room_id: (round_id, phase)
        for room_id, round_id, phase in Round.objects.filter(room__experiment=experiment).order_by("room_id", "index").values_list(
            "room_id", "pk", "phase"
        )
    }
    room_done = {room_id: phase == Round.Phase.DONE for room_id, (_, phase) in latest.items()}
    # Still answering the closing questions (their timer has not run out): the round is done but they are not, so their
    # status is incomplete, not completed.
    closing_open = set(
        Ranking.objects.filter(
            round_id__in=[round_id for round_id, _ in latest.values()], round__phase=Round.Phase.DONE, round__phase_deadline__isnull=False
        ).values_list("participant_id", flat=True)
    )
    for pk, room_id, label, external_id, joined, consented, finished, dropped, reason, closing_missed, researcher_seat in _iterate(
        _participants(ctx), ctx, "pk", "room_id", "label", "external_id", "joined_at", "consented_at", "finished_at",
        "dropped_out_at", "dropout_reason", "closing_missed_at", "researcher_seat",
    ):
        head: tuple[Any, ...] = (ctx.pseudonym(pk), room_id, label)
        if ctx.include_external_ids:
            head += (external_id,)
        status = Participant(finished_at=finished, dropped_out_at=dropped, closing_missed_at=closing_missed).completion_status(
            released=pk in released, round_done=room_done.get(room_id, False) and pk not in closing_open
        )
        yield (
            *head, joined, consented, finished, dropped, reason, closing_missed, released.get(pk), str(status), attention.get(pk),
            pk in excluded, researcher_seat,
        )


PARTICIPANTS = Table(
    name="participants",
    description="Everyone who joined a group. Pseudonymised: no external ids unless the export asked for them.",
    columns=_participant_columns,
    rows=_participant_rows,
    count=lambda ctx: _participants(ctx).count(),
    primary_key=("participant_id",),
)


# opinions and candidates ------------------------------------------------------------------------------


def _opinions(ctx: ExportContext) -> QuerySet[Opinion]:
    # A critique round's texts are critiques (see the critiques table), not opinions.
    return Opinion.objects.filter(round__room__experiment=ctx.experiment, round__kind=Round.Kind.OPINION).order_by("id")


def _opinion_rows(ctx: ExportContext) -> Iterator[tuple[Any, ...]]:
    for pk, round_id, participant_id, text, created_at, excluded_id, position in _iterate(
        _opinions(ctx), ctx, "pk", "round_id", "participant_id", "text", "created_at", "round__excluded_participant_id",
        "generation_position",
    ):
        yield pk, round_id, ctx.pseudonym(participant_id), text, created_at, participant_id == excluded_id, position


OPINIONS = Table(
    name="opinions",
    description="Opinions participants wrote on the question.",
    columns=lambda ctx: [
        Column("opinion_id", "integer", "Opinion id."),
        Column("round_id", "integer", "Round (see groups)."),
        Column("participant_id", "string", "Author. " + P),
        Column("text", "string", "The opinion as submitted."),
        Column("created_at", "datetime", "When it was submitted, UTC."),
        Column("excluded_from_generation", "boolean", "Exclusion protocol: this opinion was left out of generation and ranking."),
        Column(
            "generation_position", "integer",
            "Replay order: 0-based position of this opinion in the list given to the generator (sort a round's opinions by it "
            "to replay; candidates.opinion_order and each sample's shuffle index this list). Blank: not given to the generator "
            "(excluded, dropped out before mediation, or the round was not mediated).",
        ),
    ],
    rows=_opinion_rows,
    count=lambda ctx: _opinions(ctx).count(),
    primary_key=("opinion_id",),
    foreign_keys=_refs(("round_id", "groups.round_id"), ("participant_id", "participants.participant_id")),
)


SAMPLING_SEED_RULE = (
    "The seed the backend's sampler was given for this sample (blank: nothing was sampled, e.g. the stand-in generator, "
    "or a row stored before seeds were recorded). Its scope depends on candidates.backend. vllm: this sample's own seed, "
    "derive_seed(\"vllm\", seed, sample_index) mod 2^31. transformers: torch's RNG is seeded once per batch and every row "
    "of the batch draws from it, so candidates sharing a sampling_seed were sampled together; replay that batch whole "
    "(prompts in sample_index order). openai: the request's seed, shared by the choices of one request, honoured only "
    "by servers that support seeds. derive_seed is modeling.generation.prompts.derive_seed (sha256 of the parts joined by \":\")."
)


def _candidates(ctx: ExportContext) -> QuerySet[Candidate]:
    return Candidate.objects.filter(round__room__experiment=ctx.experiment).order_by("round_id", "index")


def _candidate_rows(ctx: ExportContext) -> Iterator[tuple[Any, ...]]:
    for row in _iterate(
        _candidates(ctx), ctx,
        "pk", "round_id", "index", "source_arm_id", "text", "backend", "model_id", "model_revision", "seed", "opinion_order",
        "prompt", "prompt_tokens", "completion_tokens", "latency_ms", "welfare", "welfare_method", "rank", "shown", "created_at",
        "generator_version__name", "generator_version__sha256", "sample_index", "sampling_seed", "temperature", "top_p",
        "max_new_tokens",
    ):
        yield (*row[:9], _json([ctx.pseudonym(pid) for pid in row[9]]), *row[10:])


CANDIDATES = Table(
    name="candidates",
    description="Every candidate statement the mediator wrote, with its provenance and its welfare rank.",
    columns=lambda ctx: [
        Column("candidate_id", "integer", "Candidate id."),
        Column("round_id", "integer", "Round (see groups)."),
        Column("index", "integer", "Order of generation within the round (head-to-head: the room arm's candidates first)."),
        Column("source_arm_id", "integer", "Arm whose configuration wrote and ranked it (head-to-head rounds have two)."),
        Column("text", "string", "The statement."),
        Column("backend", "string", "Generator backend that wrote it."),
        Column("model_id", "string", "Generator model that wrote it."),
        Column("model_revision", "string", "Revision or sha256 of the generator weights."),
        Column(
            "seed", "integer",
            "Seed of the generation request that wrote it: the round's seed (groups.seed) for the room's arm; in a head-to-head "
            "round the compared arm's request uses Python's random.Random(\"<round seed>:arm:<source_arm_id>\").getrandbits(31) "
            "(MediationInput.seed_for). Opinion orders and sampling seeds derive from it (see sample_index and sampling_seed).",
        ),
        Column("opinion_order", "string", "JSON array of participant ids, in the order their opinions appeared in the prompt. " + P),
        Column("prompt", "string", "The full prompt given to the generator."),
        Column("prompt_tokens", "integer", "Prompt length in tokens."),
        Column("completion_tokens", "integer", "Statement length in tokens."),
        Column("latency_ms", "number", "Generation time of this candidate in milliseconds."),
        Column("welfare", "number", "Welfare of the candidate under its source arm's welfare function, from predicted agreement."),
        Column("welfare_method", "string", "Welfare function that scored it."),
        Column("rank", "integer", "Rank under that welfare function within its source arm (1: best)."),
        Column("shown", "boolean", "Whether it was among the statements shown to participants."),
        Column("created_at", "datetime", "When it was stored, UTC."),
        Column("generator_version", "string", "Fine-tuned generator version that wrote it (blank: an untuned base model)."),
        Column("generator_version_sha256", "string", "sha256 of that version's adapter files, checked before it was loaded."),
        Column("sample_index", "integer", "Which sample of the request it is: its prompt's opinion order is a seeded shuffle of (seed, sample_index); rejected samples were replaced by fresh indices."),
        Column("sampling_seed", "integer", SAMPLING_SEED_RULE),
        Column("temperature", "number", "Sampling temperature asked for (0: greedy)."),
        Column("top_p", "number", "Nucleus (top-p) threshold asked for."),
        Column("max_new_tokens", "integer", "Token budget per statement."),
    ],
    rows=_candidate_rows,
    count=lambda ctx: _candidates(ctx).count(),
    primary_key=("candidate_id",),
    foreign_keys=_refs(("round_id", "groups.round_id"), ("source_arm_id", "arms.arm_id")),
)


def _predictions(ctx: ExportContext) -> QuerySet[PredictedAgreement]:
    return PredictedAgreement.objects.filter(candidate__round__room__experiment=ctx.experiment).order_by("id")


PREDICTED = Table(
    name="predicted_agreement",
    description="The reward model's predicted agreement of each participant with each candidate (the excluded member of an exclusion round has none).",
    columns=lambda ctx: [
        Column("candidate_id", "integer", "Candidate (see candidates)."),
        Column("participant_id", "string", P),
        Column("score", "number", "Predicted agreement on the 1–7 scale."),
        Column("reward_model", "string", "Reward model registry name."),
        Column("reward_model_version", "string", "Reward model version (weights) that predicted it."),
    ],
    rows=lambda ctx: (
        (c, ctx.pseudonym(p), s, m, v)
        for c, p, s, m, v in _iterate(_predictions(ctx), ctx, "candidate_id", "participant_id", "score", "reward_model", "reward_model_version")
    ),
    count=lambda ctx: _predictions(ctx).count(),
    primary_key=("candidate_id", "participant_id"),
    foreign_keys=_refs(("candidate_id", "candidates.candidate_id"), ("participant_id", "participants.participant_id")),
)


def _presentations(ctx: ExportContext) -> QuerySet[Presentation]:
    return Presentation.objects.filter(participant__room__experiment=ctx.experiment).order_by("participant_id", "position")


PRESENTATIONS = Table(
    name="presentations",
    description="Which statements each participant was shown, in the order they saw them (randomised per participant).",
    columns=lambda ctx: [
        Column("participant_id", "string", P),
        Column("candidate_id", "integer", "Candidate shown (see candidates)."),
        Column("position", "integer", "Position on the participant's page (1: first)."),
    ],
    rows=lambda ctx: ((ctx.pseudonym(p), c, pos + 1) for p, c, pos in _iterate(_presentations(ctx), ctx, "participant_id", "candidate_id", "position")),
    count=lambda ctx: _presentations(ctx).count(),
    primary_key=("participant_id", "candidate_id"),
    foreign_keys=_refs(("candidate_id", "candidates.candidate_id"), ("participant_id", "participants.participant_id")),
)


# ratings -------------------------------------------------------------------------------------------------


def _ratings(ctx: ExportContext) -> QuerySet[Rating]:
    return Rating.objects.filter(participant__room__experiment=ctx.experiment).order_by("id")


LIKERT_AGREEMENT = AGREEMENT_SCALE_TEXT

AGREEMENT = Table(
    name="agreement_ratings",
    description="Each participant's agreement with each statement shown to them.",
    columns=lambda ctx: [
        Column("rating_id", "integer", "Rating id (shared with quality_ratings: one form gave both)."),
        Column("participant_id", "string", P),
        Column("candidate_id", "integer", "Statement rated (see candidates)."),
        Column("agreement", "integer", LIKERT_AGREEMENT),
        Column("created_at", "datetime", "When the rating was first given, UTC."),
    ],
    rows=lambda ctx: (
        (r, ctx.pseudonym(p), c, a, t) for r, p, c, a, t in _iterate(_ratings(ctx), ctx, "pk", "participant_id", "candidate_id", "agreement", "created_at")
    ),
    count=lambda ctx: _ratings(ctx).count(),
    primary_key=("rating_id",),
    foreign_keys=_refs(("candidate_id", "candidates.candidate_id"), ("participant_id", "participants.participant_id")),
)

QUALITY = Table(
    name="quality_ratings",
    description="Each participant's rating of each shown statement's quality as a summary the whole group could endorse.",
    columns=lambda ctx: [
        Column("rating_id", "integer", "Rating id (shared with agreement_ratings)."),
        Column("participant_id", "string", P),
        Column("candidate_id", "integer", "Statement rated (see candidates)."),
        Column("quality", "integer", "7-point quality: 1 very poor … 7 excellent."),
        Column("created_at", "datetime", "When the rating was first given, UTC."),
    ],
    rows=lambda ctx: (
        (r, ctx.pseudonym(p), c, q, t) for r, p, c, q, t in _iterate(_ratings(ctx), ctx, "pk", "participant_id", "candidate_id", "quality", "created_at")
    ),
    count=lambda ctx: _ratings(ctx).count(),
    primary_key=("rating_id",),
    foreign_keys=_refs(("candidate_id", "candidates.candidate_id"), ("participant_id", "participants.participant_id")),
)


def _opinion_ratings(ctx: ExportContext) -> QuerySet[OpinionRating]:
    return OpinionRating.objects.filter(participant__room__experiment=ctx.experiment).order_by("id")


OPINION_RATINGS = Table(
    name="opinion_ratings",
    description="Best-human-opinion protocol: each participant's agreement with the other members' anonymised opinions.",
    columns=lambda ctx: [
        Column("participant_id", "string", "Rater. " + P),
        Column("opinion_id", "integer", "Opinion rated (see opinions)."),
        Column("agreement", "integer", LIKERT_AGREEMENT),
        Column("created_at", "datetime", "When it was first given, UTC."),
    ],
    rows=lambda ctx: ((ctx.pseudonym(p), o, a, t) for p, o, a, t in _iterate(_opinion_ratings(ctx), ctx, "participant_id", "opinion_id", "agreement", "created_at")),
    count=lambda ctx: _opinion_ratings(ctx).count(),
    primary_key=("participant_id", "opinion_id"),
    foreign_keys=_refs(("opinion_id", "opinions.opinion_id"), ("participant_id", "participants.participant_id")),
)


def _rankings(ctx: ExportContext) -> QuerySet[Ranking]:
    return Ranking.objects.filter(participant__room__experiment=ctx.experiment).order_by("id")


def _ranking_rows(ctx: ExportContext) -> Iterator[tuple[Any, ...]]:
    for participant_id, round_id, order, created_at in _iterate(_rankings(ctx), ctx, "participant_id", "round_id", "order", "created_at"):
        for position, candidate_id in enumerate(order, start=1):
            yield ctx.pseudonym(participant_id), round_id, candidate_id, position, created_at


def _ranking_count(ctx: ExportContext) -> int:
    return sum(len(order) for order in _rankings(ctx).values_list("order", flat=True).iterator(chunk_size=ctx.chunk_size))


RANKINGS = Table(
    name="rankings",
    description="Each participant's final ranking of the statements shown to them, one row per ranked statement.",
    columns=lambda ctx: [
        Column("participant_id", "string", P),
        Column("round_id", "integer", "Round (see groups)."),
        Column("candidate_id", "integer", "Statement ranked (see candidates)."),
        Column("rank", "integer", "1: the statement the participant would most like the group to adopt."),
        Column("created_at", "datetime", "When the ranking was submitted, UTC."),
    ],
    rows=_ranking_rows,
    count=_ranking_count,
    primary_key=("participant_id", "round_id", "candidate_id"),
    foreign_keys=_refs(("round_id", "groups.round_id"), ("candidate_id", "candidates.candidate_id"), ("participant_id", "participants.participant_id")),
)


def _preferences(ctx: ExportContext) -> QuerySet[PairwisePreference]:
    return PairwisePreference.objects.filter(participant__room__experiment=ctx.experiment).order_by("id")


def _preference_rows(ctx: ExportContext) -> Iterator[tuple[Any, ...]]:
    for p, r, a, b, arm_a, arm_b, preferred, preferred_arm, t in _iterate(
        _preferences(ctx), ctx, "participant_id", "round_id", "candidate_a_id", "candidate_b_id", "candidate_a__source_arm_id",
        "candidate_b__source_arm_id", "preferred_id", "preferred__source_arm_id", "created_at",
    ):
        yield ctx.pseudonym(p), r, a, b, arm_a, arm_b, preferred, preferred_arm, t


PREFERENCES = Table(
    name="pairwise_preferences",
    description="Head-to-head protocol: which of two shown statements from different arms a participant preferred.",
    columns=lambda ctx: [
        Column("participant_id", "string", P),
        Column("round_id", "integer", "Round (see groups)."),
        Column("candidate_a_id", "integer", "The pair's statement with the lower id."),
        Column("candidate_b_id", "integer", "The pair's statement with the higher id."),
        Column("arm_a_id", "integer", "Source arm of candidate_a."),
        Column("arm_b_id", "integer", "Source arm of candidate_b."),
        Column("preferred_candidate_id", "integer", "The statement preferred (candidate_a_id or candidate_b_id)."),
        Column("preferred_arm_id", "integer", "Source arm of the preferred statement."),
        Column("created_at", "datetime", "When the preference was first given, UTC."),
    ],
    rows=_preference_rows,
    count=lambda ctx: _preferences(ctx).count(),
    primary_key=("participant_id", "candidate_a_id", "candidate_b_id"),
    foreign_keys=_refs(
        ("participant_id", "participants.participant_id"), ("round_id", "groups.round_id"), ("candidate_a_id", "candidates.candidate_id"),
        ("candidate_b_id", "candidates.candidate_id"), ("preferred_candidate_id", "candidates.candidate_id"),
        ("arm_a_id", "arms.arm_id"), ("arm_b_id", "arms.arm_id"), ("preferred_arm_id", "arms.arm_id"),
    ),
)


def _attention(ctx: ExportContext) -> QuerySet[AttentionCheck]:
    return AttentionCheck.objects.filter(participant__room__experiment=ctx.experiment).order_by("id")


ATTENTION = Table(
    name="attention_checks",
    description="Instructed-response items: the participant was asked to pick a given answer.",
    columns=lambda ctx: [
        Column("participant_id", "string", P),
        Column("round_id", "integer", "Round (see groups)."),
        Column("expected", "integer", "The answer the item asked for (1–7)."),
        Column("answer", "integer", "The answer given (1–7; the first answer counts)."),
        Column("passed", "boolean", "answer equals expected."),
        Column("created_at", "datetime", "When it was answered, UTC."),
    ],
    rows=lambda ctx: ((ctx.pseudonym(p), r, e, a, ok, t) for p, r, e, a, ok, t in _iterate(_attention(ctx), ctx, "participant_id", "round_id", "expected", "answer", "passed", "created_at")),
    count=lambda ctx: _attention(ctx).count(),
    primary_key=("participant_id", "round_id"),
    foreign_keys=_refs(("participant_id", "participants.participant_id"), ("round_id", "groups.round_id")),
)


# timings -----------------------------------------------------------------------------------------------------

_ROUND_PHASES = [
    ("opinions", "opinions_started_at"),
    ("mediating", "mediation_started_at"),
    ("rating", "rating_started_at"),
    ("done", "finished_at"),
]
_PARTICIPANT_EVENTS = [("joined", "joined_at"), ("consented", "consented_at"), ("finished", "finished_at"), ("dropped_out", "dropped_out_at")]


def _timing_rows(ctx: ExportContext) -> Iterator[tuple[Any, ...]]:
    # Phases of each round: a phase lasts until the next one that happened.
    for row in _iterate(_rounds(ctx), ctx, "room_id", "pk", *[f for _, f in _ROUND_PHASES]):
        room_id, round_id, stamps = row[0], row[1], row[2:]
        for i, (phase, _) in enumerate(_ROUND_PHASES):
            if stamps[i] is None:
                continue
            following = next((s for s in stamps[i + 1 :] if s is not None), None)
            yield None, room_id, round_id, f"phase:{phase}", stamps[i], _seconds(stamps[i], following)
    # Participant milestones.
    for row in _iterate(_participants(ctx), ctx, "pk", "room_id", *[f for _, f in _PARTICIPANT_EVENTS]):
        for (event, _), at in zip(_PARTICIPANT_EVENTS, row[2:]):
            if at is not None:
                yield ctx.pseudonym(row[0]), row[1], None, event, at, None
    for p, room_id, round_id, at in _iterate(_opinions(ctx), ctx, "participant_id", "round__room_id", "round_id", "created_at"):
        yield ctx.pseudonym(p), room_id, round_id, "opinion_submitted", at, None
    for p, room_id, round_id, at in _iterate(_rankings(ctx), ctx, "participant_id", "round__room_id", "round_id", "created_at"):
        yield ctx.pseudonym(p), room_id, round_id, "ranking_submitted", at, None
    # Screens: each lasts until the participant's next screen (the last one has no known end).
    views = _page_views(ctx).values_list("participant_id", "participant__room_id", "round_id", "view", "shown_at")
    previous: tuple[Any, ...] | None = None
    for current in views.iterator(chunk_size=ctx.chunk_size):
        if previous is not None:
            end = current[4] if current[0] == previous[0] else None
            yield ctx.pseudonym(previous[0]), previous[1], previous[2], f"page:{previous[3]}", previous[4], _seconds(previous[4], end)
        previous = current
    if previous is not None:
        yield ctx.pseudonym(previous[0]), previous[1], previous[2], f"page:{previous[3]}", previous[4], None


def _page_views(ctx: ExportContext) -> QuerySet[PageView]:
    return PageView.objects.filter(participant__room__experiment=ctx.experiment).order_by("participant_id", "shown_at", "id")


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start is not None and end is not None else None


def _timing_count(ctx: ExportContext) -> int:
    rounds = _rounds(ctx).aggregate(**{f: Count(f) for _, f in _ROUND_PHASES})
    people = _participants(ctx).aggregate(**{f: Count(f) for _, f in _PARTICIPANT_EVENTS})
    return sum(rounds.values()) + sum(people.values()) + _opinions(ctx).count() + _rankings(ctx).count() + _page_views(ctx).count()


TIMINGS = Table(
    name="timings",
    description="Timestamped events: each round's phases, each participant's milestones and every screen they were shown, with durations.",
    columns=lambda ctx: [
        Column("participant_id", "string", "Blank for a round's phase. " + P),
        Column("group_id", "integer", "Group (room)."),
        Column("round_id", "integer", "Round (blank for join, consent, finish and dropout events)."),
        Column("event", "string", "phase:<phase> (a round entered the phase), page:<screen> (a participant was shown the screen: waiting, opinions, opinion_sent, mediating, rating, done, released, dropped, not_rating), joined, consented, opinion_submitted, ranking_submitted, finished or dropped_out."),
        Column("at", "datetime", "When it happened, UTC."),
        Column("duration_seconds", "number", "For phases and screens: seconds until the next phase or screen (blank if none followed)."),
    ],
    rows=_timing_rows,
    count=_timing_count,
    foreign_keys=_refs(("participant_id", "participants.participant_id"), ("round_id", "groups.round_id")),
)

# The Habermas Machine protocol (docs/habermas-protocol.md) -----------------------------------------


def _protocol_rounds(ctx: ExportContext) -> QuerySet[Round]:
    return _rounds(ctx).filter(Q(kind=Round.Kind.CRITIQUE) | Q(mediator__isnull=False) | Q(room__experiment__critique_rounds__gt=0))


PROTOCOL_ROUNDS = Table(
    name="protocol_rounds",
    description="Rounds of the Habermas Machine protocol: which kind, which statement a critique round revised, who mediated.",
    columns=lambda ctx: [
        Column("round_id", "integer", "Round (see groups)."),
        Column("group_id", "integer", "Group (room) id."),
        Column("round_index", "integer", "Round number within the group (0: the opinion round; 1, 2, ...: critique rounds)."),
        Column("kind", "string", "opinion (opinions, then statements) or critique (critiques of the previous winner, then revised statements)."),
        Column("previous_winner_candidate_id", "integer", "Critique rounds: the statement critiqued, the previous round's winner (Borda count of the members' rankings; ties by welfare rank)."),
        Column("winner_candidate_id", "integer", "This round's winning statement, by the same rule (blank: none was shown)."),
        Column("human_mediator_id", "string", "Human mediator arm: the member who wrote this round's statement. " + P),
    ],
    rows=lambda ctx: (
        (pk, room_id, index, kind, previous, winner.pk if (winner := Round(pk=pk).winning_candidate()) else None, ctx.pseudonym(mediator))
        for pk, room_id, index, kind, previous, mediator in _iterate(
            _protocol_rounds(ctx), ctx, "pk", "room_id", "index", "kind", "previous_winner_id", "mediator_id"
        )
    ),
    count=lambda ctx: _protocol_rounds(ctx).count(),
)


def _critiques(ctx: ExportContext) -> QuerySet[Opinion]:
    return Opinion.objects.filter(round__room__experiment=ctx.experiment, round__kind=Round.Kind.CRITIQUE).order_by("id")


CRITIQUES = Table(
    name="critiques",
    description="Critiques members wrote of the previous round's winning statement, in critique rounds.",
    columns=lambda ctx: [
        Column("critique_id", "integer", "Critique id."),
        Column("round_id", "integer", "Critique round (see groups, protocol_rounds)."),
        Column("round_index", "integer", "Round number within the group."),
        Column("participant_id", "string", "Author. " + P),
        Column("previous_winner_candidate_id", "integer", "The statement critiqued (see candidates)."),
        Column("text", "string", "The critique as submitted."),
        Column("created_at", "datetime", "When it was submitted, UTC."),
    ],
    rows=lambda ctx: (
        (pk, round_id, index, ctx.pseudonym(participant_id), previous, text, created_at)
        for pk, round_id, index, participant_id, previous, text, created_at in _iterate(
            _critiques(ctx), ctx, "pk", "round_id", "round__index", "participant_id", "round__previous_winner_id", "text", "created_at"
        )
    ),
    count=lambda ctx: _critiques(ctx).count(),
)


def _positions(ctx: ExportContext) -> QuerySet[Position]:
    return Position.objects.filter(participant__room__experiment=ctx.experiment).order_by("id")


POSITIONS = Table(
    name="positions",
    description="Members' positions on the question before their first opinion and after the last round.",
    columns=lambda ctx: [
        Column("position_id", "integer", "Position id."),
        Column("participant_id", "string", P),
        Column("round_id", "integer", "Round it was given in (before: the first; after: the last played)."),
        Column("stage", "string", "before or after."),
        Column("position", "integer", "1: the question's negating statement ... 7: its affirming statement (see questions)."),
        Column("strength", "integer", "How strongly the position is held: 1 not at all strongly ... 7 extremely strongly."),
        Column("created_at", "datetime", "When it was given, UTC."),
    ],
    rows=lambda ctx: (
        (pk, ctx.pseudonym(p), r, stage, position, strength, t)
        for pk, p, r, stage, position, strength, t in _iterate(
            _positions(ctx), ctx, "pk", "participant_id", "round_id", "stage", "position", "strength", "created_at"
        )
    ),
    count=lambda ctx: _positions(ctx).count(),
)


def _final_preferences(ctx: ExportContext) -> QuerySet[FinalPreference]:
    return FinalPreference.objects.filter(participant__room__experiment=ctx.experiment).order_by("id")


FINAL_PREFERENCES = Table(
    name="final_preferences",
    description="After the last critique round: whether each member preferred the first round's or the revised statement.",
    columns=lambda ctx: [
        Column("final_preference_id", "integer", "Final preference id."),
        Column("participant_id", "string", P),
        Column("first_candidate_id", "integer", "The first round's winning statement (see candidates)."),
        Column("revised_candidate_id", "integer", "The last critique round's winning statement (see candidates)."),
        Column("preferred_candidate_id", "integer", "The one preferred."),
        Column("prefers_revision", "boolean", "The revised statement was preferred."),
        Column("revised_shown_first", "boolean", "The revised statement was shown first (a seeded draw per member)."),
        Column("created_at", "datetime", "When it was given, UTC."),
    ],
    rows=lambda ctx: (
        (pk, ctx.pseudonym(p), first, revised, preferred, preferred == revised, shown_first, t)
        for pk, p, first, revised, preferred, shown_first, t in _iterate(
            _final_preferences(ctx), ctx, "pk", "participant_id", "first_candidate_id", "revised_candidate_id", "preferred_id",
            "revised_shown_first", "created_at",
        )
    ),
    count=lambda ctx: _final_preferences(ctx).count(),
)


def _human_statements(ctx: ExportContext) -> QuerySet[Candidate]:
    return _candidates(ctx).filter(author__isnull=False)


HUMAN_STATEMENTS = Table(
    name="human_statements",
    description="Statements written by a human mediator (they are also in candidates, backend 'human'), with their author.",
    columns=lambda ctx: [
        Column("candidate_id", "integer", "Candidate id (see candidates)."),
        Column("round_id", "integer", "Round (see groups, protocol_rounds)."),
        Column("author_id", "string", "The member who wrote it as mediator. " + P),
        Column("previous_winner_candidate_id", "integer", "Critique rounds: the statement it revises."),
        Column("text", "string", "The statement as submitted."),
        Column("writing_ms", "number", "Time from the start of the mediation phase to the submission, in milliseconds."),
        Column("created_at", "datetime", "When it was submitted, UTC."),
    ],
    rows=lambda ctx: (
        (pk, r, ctx.pseudonym(a), previous, text, ms, t)
        for pk, r, a, previous, text, ms, t in _iterate(
            _human_statements(ctx), ctx, "pk", "round_id", "author_id", "round__previous_winner_id", "text", "latency_ms", "created_at"
        )
    ),
    count=lambda ctx: _human_statements(ctx).count(),
)

PROTOCOL_TABLES = [PROTOCOL_ROUNDS, CRITIQUES, POSITIONS, FINAL_PREFERENCES, HUMAN_STATEMENTS]


# exclusions (analysis rules) and simulated participants ---------------------------------------------------


def _exclusion_rows(ctx: ExportContext) -> Iterator[tuple[Any, ...]]:
    from . import selectors

    removed = {
        rule: set(selectors.participants_excluded_by(ctx.experiment, rule).values_list("pk", flat=True)) for rule in selectors.EXCLUSION_RULES
    }
    for pk, room_id, persona in _iterate(_participants(ctx), ctx, "pk", "room_id", "simulated_persona"):
        rules = [rule for rule in selectors.EXCLUSION_RULES if pk in removed[rule]]
        yield (
            ctx.pseudonym(pk), room_id, persona is not None, _json(persona) if persona is not None else None,
            *(pk in removed[rule] for rule in selectors.EXCLUSION_RULES), "+".join(rules) or None,
        )


EXCLUSIONS = Table(
    name="exclusions",
    description="Per participant: whether simulate_cohort's bots played it (and as which persona), and which of the "
    "analytics' exclusion rules remove it (docs/analytics.md). The analytics page and analytics.csv name the rules applied.",
    columns=lambda ctx: [
        Column("participant_id", "string", P),
        Column("group_id", "integer", "Group (room)."),
        Column("simulated", "boolean", "A simulated participant (a bot of simulate_cohort), not a person."),
        Column("persona", "string", "The bot's persona as JSON (stance +1/-1, strength 0-1, attentive); blank for people."),
        Column("dropouts", "boolean", "Rule dropouts: recorded as dropped out and not finished."),
        Column("failed_attention", "boolean", "Rule failed_attention: failed an attention check."),
        Column("incomplete_groups", "boolean", "Rule incomplete_groups: in a group whose round did not end completed, or in which a member did not finish."),
        Column("excluded_by", "string", "The rules that remove this participant, joined by + (blank: none)."),
    ],
    rows=_exclusion_rows,
    count=lambda ctx: _participants(ctx).count(),
    primary_key=("participant_id",),
    foreign_keys=_refs(("participant_id", "participants.participant_id")),
)


# lineage (the flywheel): which generator versions wrote statements, and what they were trained from -----

GENERATOR_VERSIONS = Table(
    name="generator_versions",
    description="Fine-tuned generator versions the arms named or the candidates cite, and their ancestors (research.export_lineage).",
    columns=lambda ctx: [
        Column("generator_version", "string", "Version name (candidates.generator_version)."),
        Column("parent", "string", "The version it was trained from (blank: the base model)."),
        Column("training_method", "string", "sft (statements groups rated highly) or dpo (preferred vs rejected statements)."),
        Column("weights", "string", "lora (an adapter over the base model) or full (all weights)."),
        Column("base_model", "string", "Base model the version was trained on."),
        Column("base_model_sha256", "string", "sha256 of the base model's weights."),
        Column("adapter_sha256", "string", "sha256 of the version's adapter files (candidates.generator_version_sha256)."),
        Column("dataset_sha256", "string", "sha256 of the training examples, in order."),
        Column("params", "string", "JSON: hyper-parameters and data files of the training run."),
        Column("metrics", "string", "JSON: losses before and after, rows, steps, time."),
        Column("created_at", "datetime", "When the version was registered, UTC."),
    ],
    rows=lambda ctx: export_lineage.lineage_rows(ctx.experiment),
    count=lambda ctx: len(export_lineage.versions_used(ctx.experiment)),
)


TABLES: list[Table] = [
    EXPERIMENT, QUESTIONS, ARMS, GROUPS, PARTICIPANTS, OPINIONS, CANDIDATES, PREDICTED, PRESENTATIONS,
    AGREEMENT, QUALITY, OPINION_RATINGS, RANKINGS, PREFERENCES, ATTENTION, TIMINGS, *PROTOCOL_TABLES, GENERATOR_VERSIONS,
]
TABLES.append(EXCLUSIONS)  # kept apart from the list above: the analytics' exclusion rules and the bot flags


# --- Writers ----------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


# Cells a spreadsheet would evaluate as a formula (OWASP, "CSV Injection"): those starting with one of these.
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
CSV_ESCAPING_NOTE = (
    "CSV cells are made safe to open in a spreadsheet (OWASP's advice on CSV injection): a text cell that starts with "
    "`=`, `+`, `-`, `@`, a tab or a carriage return is written with a single quote (`'`) in front, so it is shown as text "
    "rather than evaluated as a formula; NUL, other control characters (but tab and line breaks) and bidirectional "
    "controls are removed from text cells. Numbers are written as they are. Strip a leading `'` from such text cells "
    "to recover the value, or use the JSONL or Parquet export, which keeps every value raw."
)


def spreadsheet_safe(value: str) -> str:
    """A text cell for CSV: without control or bidirectional characters, and quoted if a spreadsheet would run it as a formula."""
    value = clean_text(value)
    return "'" + value if value.startswith(FORMULA_TRIGGERS) else value


def _csv_cell(value: Any) -> str:
    # Only text is escaped: a negative number stays a number.
    return spreadsheet_safe(value) if isinstance(value, str) else _text(value)


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


class _Writer:
    def __init__(self, path: Path, columns: Sequence[Column]) -> None:
        self.path, self.columns = path, columns

    def write(self, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _CsvWriter(_Writer):
    def __init__(self, path: Path, columns: Sequence[Column]) -> None:
        super().__init__(path, columns)
        self.file = path.open("w", newline="", encoding="utf-8")
        self.csv = csv.writer(self.file)
        self.csv.writerow([c.name for c in columns])

    def write(self, rows: list[tuple[Any, ...]]) -> None:
        self.csv.writerows([_csv_cell(v) for v in row] for row in rows)

    def close(self) -> None:
        self.file.close()


class _JsonlWriter(_Writer):
    def __init__(self, path: Path, columns: Sequence[Column]) -> None:
        super().__init__(path, columns)
        self.file = path.open("w", encoding="utf-8")
        self.names = [c.name for c in columns]

    def write(self, rows: list[tuple[Any, ...]]) -> None:
        self.file.writelines(
            json.dumps(dict(zip(self.names, (_jsonable(v) for v in row))), ensure_ascii=False) + "\n" for row in rows
        )

    def close(self) -> None:
        self.file.close()


class _ParquetWriter(_Writer):
    def __init__(self, path: Path, columns: Sequence[Column]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        super().__init__(path, columns)
        types = {
            "integer": pa.int64(),
            "number": pa.float64(),
            "string": pa.string(),
            "boolean": pa.bool_(),
            "datetime": pa.timestamp("us", tz="UTC"),
        }
        self.pa = pa
        self.schema = pa.schema([pa.field(c.name, types[c.type]) for c in columns]).with_metadata(_pandas_metadata(columns))
        self.writer = pq.ParquetWriter(str(path), self.schema)

    def write(self, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            arrays = [self.pa.array([row[i] for row in rows], type=f.type) for i, f in enumerate(self.schema)]
            self.writer.write_batch(self.pa.RecordBatch.from_arrays(arrays, schema=self.schema))

    def close(self) -> None:
        self.writer.close()


# pandas dtypes that hold a blank without changing the column's type: pandas (and so Frictionless,
# which reads Parquet through pandas) would otherwise turn an integer column with a blank into floats.
_PANDAS_DTYPES = {"integer": "Int64", "number": "float64", "string": "object", "boolean": "boolean", "datetime": "datetime64[us, UTC]"}


def _pandas_metadata(columns: Sequence[Column]) -> dict[bytes, bytes]:
    """The `pandas` schema metadata pyarrow writes for a DataFrame of these nullable dtypes."""
    import pandas as pd
    import pyarrow as pa

    frame = pd.DataFrame({c.name: pd.Series([], dtype=_PANDAS_DTYPES[c.type]) for c in columns})
    return {b"pandas": pa.Schema.from_pandas(frame, preserve_index=False).metadata[b"pandas"]}


WRITERS: dict[str, type[_Writer]] = {"csv": _CsvWriter, "jsonl": _JsonlWriter, "parquet": _ParquetWriter}


def _write_table(table: Table, ctx: ExportContext, path: Path, fmt: str, on_rows: Callable[[int], None]) -> int:
    columns = table.columns(ctx)
    writer = WRITERS[fmt](path, columns)
    written = 0
    batch: list[tuple[Any, ...]] = []
    try:
        for row in table.rows(ctx):
            if len(row) != len(columns):
                raise AssertionError(f"table {table.name}: a row has {len(row)} values for {len(columns)} columns")
            batch.append(row)
            if len(batch) >= ctx.chunk_size:
                writer.write(batch)
                written += len(batch)
                on_rows(len(batch))
                batch = []
        writer.write(batch)
        written += len(batch)
        on_rows(len(batch))
    finally:
        writer.close()
    return written


# --- Data dictionary --------------------------------------------------------------------------------

REPLAY_NOTE = (
    "A round's candidates are reproduced from: the question (`groups.question_id`), the opinions given to the "
    "generator in `opinions.generation_position` order (the excluded member's and dropouts' have none), the "
    "request seed `candidates.seed`, each candidate's `sample_index` (its prompt's opinion order is a seeded "
    "shuffle of seed and sample index; `candidates.prompt` is the exact prompt) and `sampling_seed` with the "
    "sampling settings (`temperature`, `top_p`, `max_new_tokens`), the model (`backend`, `model_id`, "
    "`model_revision`, `generator_version`) and the software (`experiment.code_version`). The ranking follows "
    "from `predicted_agreement` and the arm's welfare method and tie-break, seeded by the round's seed."
)

# Hugging Face `datasets` types of each column type, by format: CSV and JSON lines hold times as text.
_HF_DTYPES = {"integer": "int64", "number": "float64", "string": "string", "boolean": "bool", "datetime": "string"}


def _hf_dtype(column: Column, fmt: str) -> str:
    if column.type == "datetime" and fmt == "parquet":
        return "timestamp[us, tz=UTC]"
    return _HF_DTYPES[column.type]


def _dataset_card_header(ctx: ExportContext, fmt: str) -> list[str]:
    """YAML front matter that Hugging Face `datasets` reads: one configuration per table, with its types.

    With it, `load_dataset("<unzipped folder>", "<table>")` loads a table by name, and an empty table still has
    its columns (load it with streaming=True: datasets refuses a split with no rows).
    """
    lines = ["---", "configs:"]
    for table in TABLES:
        lines += [f"- config_name: {table.name}", f"  data_files: {table.name}.{fmt}"]
    lines.append("dataset_info:")
    for table in TABLES:
        lines += [f"- config_name: {table.name}", "  features:"]
        for column in table.columns(ctx):
            lines += [f"  - name: {column.name}", f"    dtype: {_hf_dtype(column, fmt)}"]
    return [*lines, "---", ""]


def _loading_note(fmt: str) -> str:
    return (
        "Frictionless: `frictionless validate datapackage.json` checks every table against its schema, primary and "
        "foreign keys. Hugging Face datasets: `load_dataset(\"<this folder>\", \"participants\", split=\"train\")` "
        "(the YAML header above declares one configuration per table, with its column types). A table without rows "
        "loads with `streaming=True` (datasets refuses a split with no rows otherwise)."
        + (" In CSV, blank cells are missing values; booleans are `true`/`false`." if fmt == "csv" else "")
    )


def data_dictionary(ctx: ExportContext, fmt: str, row_counts: dict[str, int], created_at: datetime) -> tuple[str, dict[str, Any]]:
    """README.md text and the Frictionless datapackage.json, both from the table declarations."""
    experiment = ctx.experiment
    uses_hm_bank = _questions(ctx).filter(source__icontains="habermas").exists()
    version = code_version()
    lines = [
        *_dataset_card_header(ctx, fmt),
        f"# Dataset: {experiment.name} (`{experiment.slug}`)",
        "",
        f"Exported by Concord on {created_at.isoformat()} as {fmt}. One file per table; this README and "
        "`datapackage.json` (Frictionless Data, tabular-data-package) document every column.",
        "",
        "Participants are pseudonymised: `participant_id` is a keyed hash, stable within this experiment. "
        + ("External ids (recruitment panel ids) are **included** on request." if ctx.include_external_ids else "External ids are not included."),
        "Times are UTC (ISO 8601). Agreement is on a 7-point scale: 1 strongly disagree … 7 strongly agree.",
        "",
        f"Written by Concord version `{version}` (the `experiment` table repeats it with the experiment's settings).",
        "",
    ]
    if pseudonyms_reversible():
        lines += ["## Privacy warning: pseudonyms can be reversed", "", PSEUDONYM_KEY_WARNING, ""]
    lines += ["## Reproducing a round", "", REPLAY_NOTE, "", "## Loading", "", _loading_note(fmt), ""]
    if fmt == "csv":
        lines += ["## Spreadsheet safety", "", CSV_ESCAPING_NOTE, ""]
    if uses_hm_bank:
        lines += ["## Credit", "", HM_CREDIT, ""]
    lines += ["## Tables", ""]
    resources = []
    for table in TABLES:
        columns = table.columns(ctx)
        path = f"{table.name}.{fmt}"
        lines += [f"### {table.name}", "", f"`{path}` — {row_counts.get(table.name, 0)} rows. {table.description}", "",
                  "| column | type | description |", "| --- | --- | --- |"]
        lines += [f"| `{c.name}` | {c.type} | {c.description.replace('|', '/')} |" for c in columns]
        lines.append("")
        if table.primary_key:
            lines += [f"Primary key: {', '.join(f'`{k}`' for k in table.primary_key)}.", ""]
        if table.foreign_keys:
            lines += ["Foreign keys: " + "; ".join(
                f"`{', '.join(r.fields)}` → `{r.resource}.{', '.join(r.reference_fields)}`" for r in table.foreign_keys
            ) + ".", ""]
        schema: dict[str, Any] = {"fields": [{"name": c.name, "type": c.type, "description": c.description} for c in columns]}
        if table.primary_key:
            schema["primaryKey"] = list(table.primary_key)
        if table.foreign_keys:
            schema["foreignKeys"] = [
                # Frictionless names a reference to the same table with an empty resource.
                {"fields": list(r.fields), "reference": {"resource": "" if r.resource == table.name else r.resource, "fields": list(r.reference_fields)}}
                for r in table.foreign_keys
            ]
        resource: dict[str, Any] = {
            "name": table.name,
            "path": path,
            "profile": "tabular-data-resource",
            "format": fmt,
            **({"mediatype": "text/csv", "encoding": "utf-8"} if fmt == "csv" else {}),
            "description": table.description,
            "schema": schema,
        }
        if fmt == "jsonl" and not row_counts.get(table.name, 0):
            # JSON lines have no header, and Frictionless cannot read a file without lines: an empty table is
            # declared with its header inline (and its .jsonl file is empty), so the package still validates.
            del resource["path"]
            resource["format"] = "inline"
            resource["data"] = [[c.name for c in columns]]
            resource["description"] += f" (No rows: `{path}` is empty.)"
        resources.append(resource)
    concord: dict[str, Any] = {"code_version": version, "pseudonyms_reversible": pseudonyms_reversible()}
    if pseudonyms_reversible():
        concord["privacy_warning"] = PSEUDONYM_KEY_WARNING
    package: dict[str, Any] = {
        "profile": "tabular-data-package",
        "name": f"concord-{experiment.slug}".lower(),
        "title": f"Concord dataset: {experiment.name}",
        "created": created_at.isoformat(),
        "version": version,
        "concord": concord,
        "resources": resources,
    }
    if uses_hm_bank:
        package["sources"] = [{"title": "Habermas Machine question bank (google-deepmind/habermas_machine)"}]
        package["licenses"] = [{"name": "CC-BY-4.0", "title": "Creative Commons Attribution 4.0 (question bank)", "path": "https://creativecommons.org/licenses/by/4.0/"}]
    return "\n".join(lines), package


# --- Running an export --------------------------------------------------------------------------------


@dataclass
class ExportOutcome:
    path: Path
    sha256: str
    row_counts: dict[str, int]


def write_dataset(
    *, experiment: Experiment, fmt: str, out_dir: Path, include_external_ids: bool, name: str,
    on_progress: ProgressCallback | None = None, chunk_size: int = CHUNK_SIZE,
) -> ExportOutcome:
    """Write every table to `out_dir/name.zip`, streaming rows; the zip appears only when complete."""
    if fmt not in WRITERS:
        raise ValueError(f"unknown format {fmt!r}")
    ctx = ExportContext(experiment=experiment, include_external_ids=include_external_ids, chunk_size=chunk_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / f".{name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)  # leftovers of a crashed attempt
    scratch.mkdir()
    try:
        total = sum(table.count(ctx) for table in TABLES)
        done = [0]
        row_counts: dict[str, int] = {}
        for table in TABLES:
            def on_rows(n: int, table_name: str = table.name) -> None:
                done[0] += n
                if on_progress is not None:
                    on_progress(table_name, done[0], max(total, done[0]))

            row_counts[table.name] = _write_table(table, ctx, scratch / f"{table.name}.{fmt}", fmt, on_rows)
        readme, package = data_dictionary(ctx, fmt, row_counts, timezone.now())
        (scratch / "README.md").write_text(readme, encoding="utf-8")
        (scratch / "datapackage.json").write_text(json.dumps(package, indent=2, ensure_ascii=False), encoding="utf-8")
        partial_zip = out_dir / f".{name}.zip.partial"
        with zipfile.ZipFile(partial_zip, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for member in ["README.md", "datapackage.json", *[f"{t.name}.{fmt}" for t in TABLES]]:
                archive.write(scratch / member, arcname=f"{name}/{member}")
        final = out_dir / f"{name}.zip"
        os.replace(partial_zip, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    digest = hashlib.sha256()
    with final.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return ExportOutcome(path=final, sha256=digest.hexdigest(), row_counts=row_counts)


def run_export(*, export_id: int, on_progress: ProgressCallback | None = None) -> str:
    """Carry out one audited export (the task body; the command calls it directly for a synchronous run)."""
    export = services.dataset_export_claim(export_id=export_id)
    if export is None:
        return "already done"
    name = f"{export.experiment.slug}-export-{export.pk}-{export.format}"

    def progress(table: str, done: int, total: int) -> None:
        services.dataset_export_progress(export_id=export_id, done=done, total=total)
        if on_progress is not None:
            on_progress(table, done, total)

    try:
        outcome = write_dataset(
            experiment=export.experiment, fmt=export.format, out_dir=Path(export.out_dir),
            include_external_ids=export.include_external_ids, name=name, on_progress=progress,
        )
    except Exception as error:
        logger.exception("Export %s failed", export_id)
        services.dataset_export_fail(export_id=export_id, error=f"{type(error).__name__}: {error}")
        return "failed"
    services.dataset_export_finish(export_id=export_id, path=str(outcome.path), sha256=outcome.sha256, row_counts=outcome.row_counts)
    return "done"


def export_for(export: DatasetExport) -> Path | None:
    path = Path(export.path) if export.path else None
    return path if path is not None and path.is_file() else None
