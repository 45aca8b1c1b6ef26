"""The data model keeps enough to replay and analyse every round.

Writes go through deliberation.services; reads through deliberation.selectors.
"""

from __future__ import annotations

import secrets
from datetime import datetime

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import F, Q
from django.utils import timezone
from django.utils.crypto import salted_hmac

from modeling.generation.registry import BACKENDS
from modeling.likert import LIKERT_MAX, LIKERT_MIN
from modeling.pipeline import PipelineStage
from modeling.reward.registry import REWARD_MODELS
from modeling.training.methods import training_method_choices
from modeling.welfare import TIE_BREAK_LABELS, WELFARE_LABELS

LIKERT = [MinValueValidator(LIKERT_MIN), MaxValueValidator(LIKERT_MAX)]
# A round can be mediated once this many members have written; fewer end it as abandoned.
MIN_OPINIONS_FOR_MEDIATION = 2
# The most critique-and-revision rounds an experiment may ask for.
MAX_CRITIQUE_ROUNDS = 3
# Claims of one round's mediation (Celery retries and recoveries together) before it ends as failed.
MAX_MEDIATION_ATTEMPTS = 3


# Choices built from the modeling registries, so each name is written once (there). Callables keep
# migrations stable when a backend or method is added.
def generator_backend_choices() -> list[tuple[str, str]]:
    return [(name, name) for name in BACKENDS]


def reward_model_choices() -> list[tuple[str, str]]:
    return [(name, name) for name in REWARD_MODELS]


def welfare_method_choices() -> list[tuple[str, str]]:
    return list(WELFARE_LABELS.items())


def tie_break_choices() -> list[tuple[str, str]]:
    return list(TIE_BREAK_LABELS.items())


def _new_code() -> str:
    return secrets.token_urlsafe(12)


def _new_assignment_seed() -> int:
    # A fresh seed per experiment, recorded on it, so every arm assignment can be reproduced.
    return secrets.randbits(31)


class Question(models.Model):
    """A question from a bank (the Habermas Machine bank, or the demo set)."""

    external_id = models.CharField(max_length=64, unique=True)
    text = models.TextField()
    affirming_statement = models.TextField(blank=True)
    negating_statement = models.TextField(blank=True)
    topic = models.CharField(max_length=200, blank=True, db_index=True)
    split = models.CharField(max_length=32, blank=True, db_index=True)
    source = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.text[:80]


class RewardModelVersion(models.Model):
    """A registered set of reward-model weights and how they were made."""

    kind = models.CharField(max_length=40)  # registry name, e.g. "cross-encoder"
    path = models.CharField(max_length=500, blank=True)
    base_model = models.CharField(max_length=300, blank=True)
    dataset_sha256 = models.CharField(max_length=64, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    params = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.kind} v{self.pk}"


class GeneratorVersion(models.Model):
    """A registered set of generator weights: a fine-tuned adapter (or full weights) over a base model,
    what it was trained on, and from which parent. Arms name one; every candidate records the one that wrote it.

    Registered by `train_generator` only when training succeeded (and, for the adapter shipped in the
    repository, by deliberation.mediator on first use, from the adapter's provenance record).
    """

    class Method(models.TextChoices):
        LORA = "lora", "LoRA adapter"
        FULL = "full", "Full fine-tuning"

    name = models.SlugField(max_length=100, unique=True, help_text="Also the served model name for the openai backend.")
    base_model = models.CharField(max_length=300, help_text="The base model as the generator resolves it (alias, hub id or path).")
    base_model_sha256 = models.CharField(max_length=64, blank=True)
    method = models.CharField(max_length=10, choices=Method.choices, default=Method.LORA)
    # How it was trained (modeling.training.methods: sft or dpo); `method` says what form the weights take.
    training_method = models.CharField(max_length=20, choices=training_method_choices, default="sft")
    path = models.CharField(max_length=500, help_text="Directory of the adapter (or weights).")
    sha256 = models.CharField(max_length=64, help_text="Digest of the adapter's files, checked before every load.")
    dataset_sha256 = models.CharField(max_length=64, blank=True)
    params = models.JSONField(default=dict, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="children")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.name


class Experiment(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        PAUSED = "paused", "Paused"
        CLOSED = "closed", "Closed"

    slug = models.SlugField(max_length=80, unique=True)
    name = models.CharField(max_length=200)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    description = models.TextField(blank=True)
    consent_text = models.TextField(blank=True)
    questions = models.ManyToManyField(Question, blank=True, related_name="experiments")

    group_size = models.PositiveSmallIntegerField(default=3, validators=[MinValueValidator(2), MaxValueValidator(8)])
    min_group_size = models.PositiveSmallIntegerField(default=2, validators=[MinValueValidator(2)])
    opinion_seconds = models.PositiveIntegerField(default=300)
    rating_seconds = models.PositiveIntegerField(default=600)
    opinion_min_chars = models.PositiveIntegerField(default=10)
    opinion_max_chars = models.PositiveIntegerField(default=1000)
    completion_code = models.CharField(max_length=64, blank=True)
    completion_url = models.URLField(blank=True)
    assignment_seed = models.BigIntegerField(default=_new_assignment_seed, help_text="Seeds the arm assignment draw (recorded per room).")
    created_at = models.DateTimeField(auto_now_add=True)

    # --- Researchers' design (issue 5) ---
    # Questions are drawn from the attached questions or, if none are attached, from the whole
    # bank, narrowed by split and topic: this is how iid and ood evaluations are run.
    question_split = models.CharField(max_length=32, blank=True, help_text="Draw only questions of this split (blank: any).")
    question_topic = models.CharField(max_length=200, blank=True, help_text="Draw only questions of this topic (blank: any).")
    max_wait_seconds = models.PositiveIntegerField(
        default=0,
        help_text="Longest wait for a group to fill. Then the round starts with fewer people (at least the minimum "
        "group size) or the waiting participants are released with a code. 0: wait for a full group.",
    )
    release_code = models.CharField(max_length=64, blank=True, help_text="Code given to released participants (blank: derived per person).")
    partial_completion_code = models.CharField(
        max_length=64, blank=True,
        help_text="Code given to members who took part to the end of the discussion but did not answer the closing questions "
        "before their timer ran out (blank: derived per person, starting with P).",
    )
    require_allow_list = models.BooleanField(default=False, help_text="Only external ids on the allow-list may join.")
    allow_several_seats_per_browser = models.BooleanField(
        default=False,
        help_text="Let one browser hold several seats (a demo opened in several windows). Off for real studies: a browser "
        "that joined is taken back to its own seat.",
    )
    attention_check = models.BooleanField(default=False, help_text="Add an instructed-response item to the rating page.")
    rate_opinions = models.BooleanField(
        default=False, help_text="Participants also rate the other members' anonymised opinions (best-human-opinion protocol)."
    )
    # --- The Habermas Machine protocol (Tessler et al. 2024; docs/habermas-protocol.md) ---
    critique_rounds = models.PositiveSmallIntegerField(
        default=0, validators=[MaxValueValidator(MAX_CRITIQUE_ROUNDS)],
        help_text="Critique-and-revision rounds after the first: members critique the winning statement and the "
        "mediator revises it. 0: one round, as Bakker et al. (2022).",
    )
    ask_positions = models.BooleanField(
        default=False,
        help_text="Members rate their position on the question (negating 1 – 7 affirming) and how strongly they hold it, "
        "before writing an opinion and again at the end.",
    )

    def __str__(self) -> str:
        return self.name

    def accepts_participants(self) -> bool:
        return self.status == self.Status.ACTIVE

    def question_pool(self) -> models.QuerySet[Question]:
        """The questions this experiment draws from: its attached ones or, if none are attached and a split
        or topic filter is set, the whole bank; either way narrowed by the split and topic filters."""
        if self.questions.exists():
            pool = self.questions.all()
        elif self.question_split or self.question_topic:
            pool = Question.objects.all()
        else:
            return Question.objects.none()
        if self.question_split:
            pool = pool.filter(split=self.question_split)
        if self.question_topic:
            pool = pool.filter(topic=self.question_topic)
        return pool.order_by("id")


class Arm(models.Model):
    """One condition of an experiment: which models write and rank its statements."""

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="arms")
    name = models.CharField(max_length=80)
    generator_backend = models.CharField(max_length=40, blank=True, choices=generator_backend_choices, help_text="Blank: the site default.")
    generator_model = models.CharField(max_length=300, blank=True, help_text="Blank: the site default.")
    generator_version = models.ForeignKey(
        GeneratorVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="arms",
        help_text="Fine-tuned weights to generate with (transformers: adapter merged at load; openai: the version's name "
        "is the served model name). Blank: the site default.",
    )
    reward_model = models.CharField(max_length=40, blank=True, choices=reward_model_choices, help_text="Blank: the site default.")
    reward_model_version = models.ForeignKey(RewardModelVersion, null=True, blank=True, on_delete=models.PROTECT)
    welfare_method = models.CharField(max_length=20, choices=welfare_method_choices, default="utilitarian")
    welfare_alpha = models.FloatField(default=1.0, validators=[MinValueValidator(0.0)])
    welfare_tie_break = models.CharField(
        max_length=10,
        choices=tie_break_choices,
        default="index",
        help_text="How exact welfare ties are broken: the lower index (deterministic), a seeded random order, "
        "or TBRC (participants' predicted ballots in a seeded random order, as the Habermas Machine's Schulze).",
    )
    n_candidates = models.PositiveSmallIntegerField(default=16, validators=[MinValueValidator(1), MaxValueValidator(64)])
    k_shown = models.PositiveSmallIntegerField(default=4, validators=[MinValueValidator(1), MaxValueValidator(16)])
    weight = models.PositiveSmallIntegerField(default=1, help_text="Relative share of groups; 0: never assigned to groups.")
    # Protocol (a), head-to-head: rounds of this arm also run the compared arm's configuration and
    # show statements from both side by side, for pairwise preferences.
    compare_with = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="compared_in",
        help_text="Head-to-head: also generate with this arm's configuration and show statements from both.",
    )
    # Protocol (c), exclusion ablation: one participant's opinion is silently left out of
    # generation and ranking; Round.excluded_participant records whose.
    exclude_one_opinion = models.BooleanField(default=False, help_text="Silently leave one participant's opinion out of generation.")
    # Human mediator arm: a member drawn when the round opens (Round.mediator) writes the group statement
    # in the browser instead of the model; the others rate it blind, in the same form as model statements.
    human_mediator = models.BooleanField(
        default=False,
        help_text="A member of the group, drawn at the start, writes the group statement instead of the model "
        "(size groups one larger: the mediator writes no opinion).",
    )

    # A researcher of the experiment (owner or editor) writes the statement from the room monitor instead of a member:
    # the room gets a researcher's seat (Participant.researcher_seat) as its mediator, and the groups need no extra member.
    mediator_is_researcher = models.BooleanField(
        default=False,
        help_text="With a human mediator: a researcher (owner or editor) writes the group statement on the room monitor's "
        "mediator page, instead of a member.",
    )

    class Meta:
        constraints = [models.UniqueConstraint(fields=["experiment", "name"], name="arm_unique_name")]

    def __str__(self) -> str:
        return f"{self.experiment.slug}/{self.name}"

    def mediation_arms(self) -> list[Arm]:
        """The configurations a round of this arm runs: its own, then (head-to-head) the compared arm's."""
        return [self, self.compare_with] if self.compare_with_id and self.compare_with else [self]

    def clean(self) -> None:
        from django.core.exceptions import ValidationError

        if self.compare_with_id is not None:
            if self.compare_with_id == self.pk:
                raise ValidationError({"compare_with": "An arm cannot be compared with itself."})
            if self.compare_with is not None and self.compare_with.experiment_id != self.experiment_id:
                raise ValidationError({"compare_with": "The compared arm must belong to the same experiment."})
            if self.k_shown < 2:
                raise ValidationError({"k_shown": "Head-to-head needs at least 2 shown statements (one from each arm)."})
        if self.mediator_is_researcher and not self.human_mediator:
            raise ValidationError({"mediator_is_researcher": "A researcher mediates only in a human-mediator arm."})


class Room(models.Model):
    class Status(models.TextChoices):
        OPEN = "open", "Open"  # accepting participants
        RUNNING = "running", "Running"
        CLOSED = "closed", "Closed"

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="rooms")
    arm = models.ForeignKey(Arm, on_delete=models.PROTECT, related_name="rooms")
    question = models.ForeignKey(Question, on_delete=models.PROTECT, related_name="rooms")
    code = models.CharField(max_length=32, unique=True, default=_new_code)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    capacity = models.PositiveSmallIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"Room {self.pk} ({self.experiment.slug})"


class Participant(models.Model):
    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="participants")
    code = models.CharField(max_length=32, unique=True, default=_new_code)
    label = models.CharField(max_length=40)  # the anonymous name others see
    external_id = models.CharField(max_length=200, blank=True, db_index=True)
    joined_at = models.DateTimeField(auto_now_add=True)
    consented_at = models.DateTimeField(null=True, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    connections = models.PositiveIntegerField(default=0)
    opinion_draft = models.TextField(blank=True)
    dropped_out_at = models.DateTimeField(null=True, blank=True)
    dropout_reason = models.CharField(max_length=200, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The Habermas Machine protocol's closing questions (final preference, position after) were still unanswered when
    # their timer ran out: the member took part to the end of the discussion (finished_at is set then too) but that
    # step is missing, which their completion status and code say (docs/habermas-protocol.md).
    closing_missed_at = models.DateTimeField(null=True, blank=True)
    # A researcher-mediated arm's mediator: not a member of the group but the seat a researcher writes the statement
    # from (the room monitor's mediator page); `researcher` is who wrote it.
    researcher_seat = models.BooleanField(default=False)
    researcher = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # Set only for simulated participants (simulate_cohort's bots): the persona they played. Null for people.
    simulated_persona = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["room", "label"], name="participant_unique_label")]

    def __str__(self) -> str:
        return f"{self.label} in room {self.room_id}"

    @property
    def has_left(self) -> bool:
        return self.dropped_out_at is not None

    @property
    def has_finished(self) -> bool:
        return self.finished_at is not None

    def _derived_code(self, purpose: str, prefix: str) -> str:
        # Derived, not stored: the same participant always gets the same code, and no one can guess
        # another's without the site's SECRET_KEY.
        digest = salted_hmac(f"concord.participant.{purpose}", self.code).hexdigest()
        return f"{prefix}{digest[:8].upper()}"

    def completion_status(self, *, released: bool, round_done: bool) -> str:
        """What this participant is owed, as the export records it (the same rule as `screen`):
        "released" (given the release code), "dropped" (no code), "completed" (given the completion
        code: they finished, or their round ended while they were still in it) or "incomplete"."""
        if released:
            return CompletionStatus.RELEASED
        if self.has_left and not self.has_finished:
            return CompletionStatus.DROPPED
        if self.closing_missed_at is not None:
            return CompletionStatus.CLOSING_MISSED
        if self.has_finished or round_done:
            return CompletionStatus.COMPLETED
        return CompletionStatus.INCOMPLETE

    def completion_code(self) -> str:
        """What a participant who took part is given for their panel (the study's fixed code, if it has one); a member
        whose closing questions timed out gets the partial code instead, so the panel can tell them apart."""
        experiment = self.room.experiment
        if self.closing_missed_at is not None:
            return experiment.partial_completion_code or self._derived_code("partial", "P")
        return experiment.completion_code or self._derived_code("completion", "C")

    def release_code(self) -> str:
        """What a participant released without a group is given (the study's fixed code, if it has one)."""
        experiment = self.room.experiment
        return experiment.release_code or self._derived_code("release", "R")

    def screen(
        self,
        *,
        round_: Round,
        has_opinion: bool,
        has_statements: bool,
        released: bool,
        has_ranked: bool = False,
        position_due: bool = False,
        closing_due: bool = False,
    ) -> str:
        """Which screen this participant sees: the round's phase, refined by what they have done.

        A participant recorded as dropped out sees that, even once the round is done: they get no
        completion code (only those who finished, or whose round ended without them failing it, do).
        The protocol's steps (docs/habermas-protocol.md) refine it: a position before the first opinion
        (`position_due`), waiting after ranking while a critique round may follow, the human mediator's
        own screen, and the closing questions (`closing_due`) after the last round."""
        if released:
            return Screen.RELEASED
        if self.has_left and not self.has_finished:
            return Screen.DROPPED
        if self.has_finished:
            return Screen.DONE
        if closing_due:
            return Screen.CLOSING
        if round_.phase == Round.Phase.DONE:
            return Screen.DONE
        if round_.mediator_id is not None and round_.mediator_id == self.pk:
            return Screen.MEDIATOR
        if round_.phase == Round.Phase.OPINIONS and position_due:
            return Screen.POSITION_BEFORE
        if round_.phase == Round.Phase.OPINIONS and has_opinion:
            return Screen.OPINION_SENT
        if round_.phase == Round.Phase.RATING and not has_statements:
            return Screen.NOT_RATING  # joined but wrote no opinion in time
        if round_.phase == Round.Phase.RATING and has_ranked:
            return Screen.RANKED
        return Screen(round_.phase)


class RoundQuerySet(models.QuerySet["Round"]):
    def current(self, *, room_id: int) -> Round:
        """The room's round in play: the latest (every room is created with its first, index 0)."""
        return self.filter(room_id=room_id).order_by("-index")[:1].get()


class Round(models.Model):
    class Phase(models.TextChoices):
        WAITING = "waiting", "Waiting for the group"
        OPINIONS = "opinions", "Writing opinions"
        MEDIATING = "mediating", "Writing statements"
        RATING = "rating", "Rating statements"
        DONE = "done", "Done"

    class Kind(models.TextChoices):
        OPINION = "opinion", "Opinion round"
        CRITIQUE = "critique", "Critique and revision"

    class Outcome(models.TextChoices):
        PENDING = "", "Pending"
        COMPLETED = "completed", "Completed"
        ABANDONED = "abandoned", "Abandoned"
        FAILED = "failed", "Failed"

    class Stage(models.TextChoices):
        """Where a mediation is, as participants and the monitor see it (Round.progress_stage)."""

        NONE = "", "Not started"
        QUEUED = "queued", "Queued"
        STARTING = "starting", "Reading the opinions"
        GENERATING = PipelineStage.GENERATING.value, "Writing statements"
        RANKING = PipelineStage.RANKING.value, "Ranking statements"
        RETRYING = "retrying", "Retrying"
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"

    objects = RoundQuerySet.as_manager()

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="rounds")
    index = models.PositiveSmallIntegerField(default=0)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.OPINION)
    phase = models.CharField(max_length=16, choices=Phase.choices, default=Phase.WAITING)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, default=Outcome.PENDING, blank=True)
    phase_deadline = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    opinions_started_at = models.DateTimeField(null=True, blank=True)
    mediation_started_at = models.DateTimeField(null=True, blank=True)
    rating_started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    progress_stage = models.CharField(max_length=32, blank=True, choices=Stage.choices)
    progress_done = models.PositiveIntegerField(default=0)
    progress_total = models.PositiveIntegerField(default=0)
    # When the mediation last showed a sign of life (queued, claimed, progress, retry): a round that
    # stays in mediation with no sign for long lost its task (deliberation.recovery.rounds_recover).
    progress_at = models.DateTimeField(null=True, blank=True)
    mediation_attempts = models.PositiveSmallIntegerField(default=0)
    mediation_error = models.TextField(blank=True)
    seed = models.BigIntegerField(default=0)
    # Exclusion ablation: whose opinion was left out of generation and ranking (null: nobody's).
    excluded_participant = models.ForeignKey(
        "Participant", null=True, blank=True, on_delete=models.SET_NULL, related_name="excluded_from_rounds"
    )
    # Critique rounds: the statement the members critiqued (the previous round's winner).
    previous_winner = models.ForeignKey(
        "Candidate", null=True, blank=True, on_delete=models.SET_NULL, related_name="critiqued_in_rounds"
    )
    # Human mediator arm: the member who writes this round's statement (writes no opinion, rates nothing).
    mediator = models.ForeignKey("Participant", null=True, blank=True, on_delete=models.SET_NULL, related_name="mediated_rounds")

    class Meta:
        ordering = ["room_id", "index"]
        constraints = [models.UniqueConstraint(fields=["room", "index"], name="round_unique_index")]

    def __str__(self) -> str:
        return f"Round {self.index} of room {self.room_id} ({self.phase})"

    # --- The round's rules ---
    def accepts_opinions(self) -> bool:
        return self.phase == self.Phase.OPINIONS

    def accepts_ratings(self) -> bool:
        return self.phase == self.Phase.RATING

    def is_finished(self) -> bool:
        return self.phase == self.Phase.DONE

    def deadline_pending(self, now: datetime) -> bool:
        """The phase has a deadline that has not come yet (a timer that fires early does nothing)."""
        return self.phase_deadline is not None and self.phase_deadline > now

    def is_overdue(self, now: datetime) -> bool:
        """The phase's deadline has passed (its timer should have fired)."""
        return self.phase_deadline is not None and self.phase_deadline <= now

    def active_participants(self) -> list[Participant]:
        """Members who have not dropped out, in joining order (a human mediator is not among the writers)."""
        return list(self.room.participants.filter(dropped_out_at__isnull=True).exclude(pk=self.mediator_id or 0).order_by("id"))

    def is_critique(self) -> bool:
        return self.kind == self.Kind.CRITIQUE

    def is_last(self, *, critique_rounds: int) -> bool:
        """No critique round follows this one."""
        return self.index >= critique_rounds

    def ranked_ids(self) -> set[int]:
        """Members who have given this round's final ranking."""
        return set(self.rankings.values_list("participant_id", flat=True))

    def winning_candidate(self) -> Candidate | None:
        """The statement this round chose: the Borda winner of the members' rankings of the shown statements,
        ties (and a round nobody ranked) broken by the mediator's own order (welfare rank, then index)."""
        shown = list(self.candidates.filter(shown=True).order_by("rank", "index"))
        if not shown:
            return None
        points = {candidate.pk: 0 for candidate in shown}
        for order in self.rankings.values_list("order", flat=True):
            for place, candidate_id in enumerate(order):
                if candidate_id in points:
                    points[candidate_id] += len(order) - place
        return max(shown, key=lambda candidate: points[candidate.pk])  # max keeps the first of equals

    def rater_ids(self) -> set[int]:
        """Members who were shown statements to rate (writers of an opinion when mediation began)."""
        return set(Presentation.objects.filter(candidate__round=self).values_list("participant_id", flat=True))

    def all_opinions_in(self) -> bool:
        active = {participant.pk for participant in self.active_participants()}
        return active <= set(self.opinions.values_list("participant_id", flat=True))

    def can_be_mediated(self, writers: int) -> bool:
        return writers >= MIN_OPINIONS_FOR_MEDIATION

    def mediation_attempts_left(self) -> bool:
        return self.mediation_attempts < MAX_MEDIATION_ATTEMPTS


class CompletionStatus(models.TextChoices):
    """Participant.completion_status: which code, if any, a participant was given."""

    COMPLETED = "completed", "Completed (given the completion code)"
    CLOSING_MISSED = "closing_missed", "Took part to the end; closing questions unanswered before their timer (given the partial code)"
    DROPPED = "dropped", "Dropped out (no code)"
    RELEASED = "released", "Released without a group (given the release code)"
    INCOMPLETE = "incomplete", "Incomplete (still in the study, or left without being recorded)"


class Screen(models.TextChoices):
    """The screens a participant can be shown (Participant.screen; PageView.view records them)."""

    WAITING = "waiting", "Waiting for the group"
    OPINIONS = "opinions", "Writing an opinion"
    OPINION_SENT = "opinion_sent", "Opinion sent"
    MEDIATING = "mediating", "Waiting for statements"
    RATING = "rating", "Rating statements"
    NOT_RATING = "not_rating", "Not rating (no opinion in time)"
    POSITION_BEFORE = "position_before", "Giving a position before the opinion"
    RANKED = "ranked", "Ranked; waiting for the others"
    MEDIATOR = "mediator", "Human mediator (writing or waiting)"
    CLOSING = "closing", "Final preference and position"
    DROPPED = "dropped", "Dropped out"
    RELEASED = "released", "Released without a group"
    DONE = "done", "Done"


class Opinion(models.Model):
    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="opinions")
    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="opinions")
    text = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)
    # Position in the list of opinions mediation gave the generator (0-based): candidates' opinion
    # orders index this list, so a round replays only with its opinions in this order. Null: not
    # given to the generator (the excluded member's, a dropout's, or not mediated yet).
    generation_position = models.PositiveSmallIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["round", "participant"], name="opinion_one_per_participant")]


class Candidate(models.Model):
    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="candidates")
    index = models.PositiveSmallIntegerField()  # order of generation
    text = models.TextField()
    backend = models.CharField(max_length=40)
    model_id = models.CharField(max_length=300)
    model_revision = models.CharField(max_length=100, blank=True)
    seed = models.BigIntegerField()
    # Participant ids, in the order their opinions appeared in the prompt.
    opinion_order = models.JSONField(default=list)
    prompt = models.TextField()
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.FloatField(default=0)
    # Reproducibility (null on rows stored before they were recorded): which sample of the generation
    # request this is, the seed its backend's sampler was given (modeling.generation.cleaning.RawSample),
    # and the sampling settings asked for.
    sample_index = models.PositiveIntegerField(null=True, blank=True)
    sampling_seed = models.BigIntegerField(null=True, blank=True)
    temperature = models.FloatField(null=True, blank=True)
    top_p = models.FloatField(null=True, blank=True)
    max_new_tokens = models.PositiveIntegerField(null=True, blank=True)
    welfare = models.FloatField(null=True, blank=True)
    welfare_method = models.CharField(max_length=20, blank=True)
    rank = models.PositiveSmallIntegerField(null=True, blank=True)  # 1 = best under the arm's welfare
    shown = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    # The arm whose configuration wrote and ranked it: the room's arm, or in a head-to-head round
    # possibly the compared arm. Rank and shown are within this source.
    source_arm = models.ForeignKey(Arm, null=True, blank=True, on_delete=models.PROTECT, related_name="sourced_candidates")
    # The fine-tuned weights that wrote it (null: an untuned base model or a backend without versions).
    generator_version = models.ForeignKey(
        GeneratorVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="candidates"
    )
    # Human mediator arm: the member who wrote it (null: a model wrote it).
    author = models.ForeignKey("Participant", null=True, blank=True, on_delete=models.SET_NULL, related_name="authored_candidates")

    class Meta:
        ordering = ["round_id", "index"]
        constraints = [models.UniqueConstraint(fields=["round", "index"], name="candidate_unique_index")]


class PredictedAgreement(models.Model):
    candidate = models.ForeignKey(Candidate, on_delete=models.CASCADE, related_name="predictions")
    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="predictions")
    score = models.FloatField()
    reward_model = models.CharField(max_length=40)
    reward_model_version = models.CharField(max_length=100, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["candidate", "participant"], name="prediction_unique_pair"),
        ]


class Presentation(models.Model):
    """Which shown candidate a participant saw at which position (randomised per participant)."""

    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="presentations")
    candidate = models.ForeignKey(Candidate, on_delete=models.CASCADE, related_name="presentations")
    position = models.PositiveSmallIntegerField()

    class Meta:
        ordering = ["participant_id", "position"]
        constraints = [
            models.UniqueConstraint(fields=["participant", "candidate"], name="presentation_unique_pair"),
        ]


class Rating(models.Model):
    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="ratings")
    candidate = models.ForeignKey(Candidate, on_delete=models.CASCADE, related_name="ratings")
    agreement = models.PositiveSmallIntegerField(validators=LIKERT)
    quality = models.PositiveSmallIntegerField(validators=LIKERT)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["participant", "candidate"], name="rating_one_per_pair"),
            models.CheckConstraint(condition=Q(agreement__gte=1, agreement__lte=7), name="rating_agreement_likert"),
            models.CheckConstraint(condition=Q(quality__gte=1, quality__lte=7), name="rating_quality_likert"),
        ]


class Ranking(models.Model):
    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="rankings")
    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="rankings")
    # Candidate ids, best first.
    order = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["participant", "round"], name="ranking_one_per_round")]


# --- Experiments, cohorts and datasets (researchers) -----------------------------------------------


class RoomAssignment(models.Model):
    """How a room's arm was drawn: enough to reproduce the draw from the experiment's seed."""

    room = models.OneToOneField(Room, on_delete=models.CASCADE, related_name="assignment")
    method = models.CharField(max_length=20)  # "balanced" (seeded draw) or "given" (chosen by a researcher or test)
    seed = models.BigIntegerField()
    ordinal = models.PositiveIntegerField()  # rooms of the experiment created before this one
    # Rooms per arm before the draw, and the arms tied for fewest (weighted), ids as strings.
    counts = models.JSONField(default=dict)
    tied_arm_ids = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)


class PairwisePreference(models.Model):
    """Protocol (a): a participant's preference between two shown statements from different arms."""

    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="preferences")
    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="preferences")
    # Stored with candidate_a_id < candidate_b_id, so a pair has one row whichever way it was shown.
    candidate_a = models.ForeignKey(Candidate, on_delete=models.CASCADE, related_name="+")
    candidate_b = models.ForeignKey(Candidate, on_delete=models.CASCADE, related_name="+")
    preferred = models.ForeignKey(Candidate, on_delete=models.CASCADE, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["participant", "candidate_a", "candidate_b"], name="preference_one_per_pair"),
            models.CheckConstraint(condition=Q(candidate_a__lt=F("candidate_b")), name="preference_pair_ordered"),
            models.CheckConstraint(
                condition=Q(preferred=F("candidate_a")) | Q(preferred=F("candidate_b")), name="preference_is_one_of_pair"
            ),
        ]


class OpinionRating(models.Model):
    """Protocol (b): a participant's agreement with another member's (anonymised) opinion."""

    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="opinion_ratings")
    opinion = models.ForeignKey(Opinion, on_delete=models.CASCADE, related_name="ratings")
    agreement = models.PositiveSmallIntegerField(validators=LIKERT)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["participant", "opinion"], name="opinion_rating_one_per_pair"),
            models.CheckConstraint(condition=Q(agreement__gte=1, agreement__lte=7), name="opinion_rating_likert"),
        ]


class AttentionCheck(models.Model):
    """An instructed-response item: the participant was asked to pick `expected`."""

    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="attention_checks")
    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="attention_checks")
    expected = models.PositiveSmallIntegerField(validators=LIKERT)
    answer = models.PositiveSmallIntegerField(validators=LIKERT)
    passed = models.BooleanField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["participant", "round"], name="attention_check_one_per_round")]


class AllowedExternalId(models.Model):
    """The allow-list of an experiment: external ids (e.g. Prolific PIDs) that may join."""

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="allowed_external_ids")
    external_id = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["experiment", "external_id"], name="allow_list_unique_id")]


class Release(models.Model):
    """A participant released without a group after the maximum wait, with the code they were given."""

    participant = models.OneToOneField(Participant, on_delete=models.CASCADE, related_name="release")
    code = models.CharField(max_length=64)
    waited_seconds = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)


class PageView(models.Model):
    """A screen a participant was shown, and when: page timings come from consecutive rows."""

    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="page_views")
    round = models.ForeignKey(Round, null=True, blank=True, on_delete=models.CASCADE, related_name="page_views")
    view = models.CharField(max_length=32)  # ParticipantState.view: waiting, opinions, rating, done, ...
    phase = models.CharField(max_length=16, blank=True)
    shown_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["participant_id", "shown_at", "id"]


class SeatTransferQuerySet(models.QuerySet["SeatTransfer"]):
    def moves_by_code(self, codes: list[str]) -> dict[str, int]:
        """How many times each participant's seat was moved to a new browser (codes with none are absent)."""
        rows = self.filter(participant__code__in=codes, used_at__isnull=False).values("participant__code").annotate(moves=models.Count("id"))
        return {row["participant__code"]: row["moves"] for row in rows}


class SeatTransfer(models.Model):
    """A researcher's one-time link that moves a participant's seat to a new browser (a participant who lost
    their browser or switched device): the only way to resume a seat without the original browser's
    session. Only a hash of the link's token is stored. Redeeming it makes the seat the new browser's:
    every browser that held the seat before no longer does (deliberation.seats counts the moves)."""

    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="seat_transfers")
    token_sha256 = models.CharField(max_length=64, unique=True)
    issued_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    issued_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)

    objects = SeatTransferQuerySet.as_manager()

    class Meta:
        ordering = ["-issued_at", "-id"]

    def __str__(self) -> str:
        return f"Seat transfer of participant {self.participant_id}"

    def is_redeemable(self, now: datetime) -> bool:
        return self.used_at is None and now < self.expires_at
# --- The Habermas Machine protocol: positions and the final preference --------------------------


class Position(models.Model):
    """A member's position on the room's question, 1 (the negating statement) to 7 (the affirming one), and
    how strongly they hold it (1–7): once before their first opinion and once at the end."""

    class Stage(models.TextChoices):
        BEFORE = "before", "Before the first opinion"
        AFTER = "after", "After the last round"

    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="positions")
    # The round it was given in: the first round (before) or the last round played (after).
    round = models.ForeignKey(Round, on_delete=models.CASCADE, related_name="positions")
    stage = models.CharField(max_length=8, choices=Stage.choices)
    position = models.PositiveSmallIntegerField(validators=LIKERT)
    strength = models.PositiveSmallIntegerField(validators=LIKERT)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["participant", "stage"], name="position_one_per_stage"),
            models.CheckConstraint(condition=Q(position__gte=1, position__lte=7), name="position_likert"),
            models.CheckConstraint(condition=Q(strength__gte=1, strength__lte=7), name="position_strength_likert"),
        ]


class FinalPreference(models.Model):
    """After the last critique round: does the member prefer the first round's statement or the revised one?"""

    participant = models.OneToOneField(Participant, on_delete=models.CASCADE, related_name="final_preference")
    first_candidate = models.ForeignKey(Candidate, on_delete=models.CASCADE, related_name="+")
    revised_candidate = models.ForeignKey(Candidate, on_delete=models.CASCADE, related_name="+")
    preferred = models.ForeignKey(Candidate, on_delete=models.CASCADE, related_name="+")
    # Which of the two was shown first (seeded per participant, so position bias can be checked).
    revised_shown_first = models.BooleanField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(preferred=F("first_candidate")) | Q(preferred=F("revised_candidate")), name="final_preference_is_one_of_two"
            ),
        ]

    @property
    def prefers_revision(self) -> bool:
        return self.preferred_id == self.revised_candidate_id
