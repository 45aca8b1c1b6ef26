"""The admin of the rooms' records: rooms, participants, rounds, and everything written in them.

Experiments, arms, questions, model versions and exports are administered in research.admin.
"""

from django.contrib import admin

from accounts.permissions import OwnedByResearcherAdmin

from .models import (
    AttentionCheck,
    Candidate,
    Opinion,
    OpinionRating,
    PageView,
    PairwisePreference,
    Participant,
    PredictedAgreement,
    Presentation,
    Ranking,
    Rating,
    Release,
    Room,
    RoomAssignment,
    Round,
    SeatTransfer,
)


class ParticipantInline(admin.TabularInline):
    model = Participant
    extra = 0
    fields = ("label", "external_id", "consented_at", "connections", "dropped_out_at", "finished_at")
    readonly_fields = fields


@admin.register(Room)
class RoomAdmin(OwnedByResearcherAdmin):
    list_display = ["id", "experiment", "arm", "status", "capacity", "created_at"]
    list_filter = ["status", "experiment"]
    inlines = [ParticipantInline]


@admin.register(Participant)
class ParticipantAdmin(OwnedByResearcherAdmin):
    experiment_path = "room__experiment"
    list_display = ["id", "label", "room", "external_id", "consented_at", "dropped_out_at", "finished_at"]
    search_fields = ["external_id", "code"]
    list_filter = ["room__experiment"]


@admin.register(Round)
class RoundAdmin(OwnedByResearcherAdmin):
    experiment_path = "room__experiment"
    list_display = ["id", "room", "index", "phase", "outcome", "mediation_attempts", "created_at"]
    list_filter = ["phase", "outcome"]


@admin.register(Opinion)
class OpinionAdmin(OwnedByResearcherAdmin):
    experiment_path = "round__room__experiment"
    list_display = ["id", "round", "participant", "text", "created_at"]


@admin.register(Candidate)
class CandidateAdmin(OwnedByResearcherAdmin):
    experiment_path = "round__room__experiment"
    list_display = ["id", "round", "index", "rank", "welfare", "shown", "backend", "model_id", "latency_ms"]
    list_filter = ["shown", "backend"]


@admin.register(PredictedAgreement)
class PredictedAgreementAdmin(OwnedByResearcherAdmin):
    experiment_path = "candidate__round__room__experiment"
    list_display = ["id", "candidate", "participant", "score", "reward_model", "reward_model_version"]


@admin.register(Presentation)
class PresentationAdmin(OwnedByResearcherAdmin):
    experiment_path = "participant__room__experiment"
    list_display = ["id", "participant", "candidate", "position"]


@admin.register(Rating)
class RatingAdmin(OwnedByResearcherAdmin):
    experiment_path = "participant__room__experiment"
    list_display = ["id", "participant", "candidate", "agreement", "quality", "created_at"]


@admin.register(Ranking)
class RankingAdmin(OwnedByResearcherAdmin):
    experiment_path = "participant__room__experiment"
    list_display = ["id", "participant", "round", "order", "created_at"]


@admin.register(RoomAssignment)
class RoomAssignmentAdmin(OwnedByResearcherAdmin):
    experiment_path = "room__experiment"
    list_display = ["room", "method", "seed", "ordinal", "tied_arm_ids", "created_at"]


@admin.register(PairwisePreference)
class PairwisePreferenceAdmin(OwnedByResearcherAdmin):
    experiment_path = "participant__room__experiment"
    list_display = ["id", "participant", "round", "candidate_a", "candidate_b", "preferred", "created_at"]


@admin.register(OpinionRating)
class OpinionRatingAdmin(OwnedByResearcherAdmin):
    experiment_path = "participant__room__experiment"
    list_display = ["id", "participant", "opinion", "agreement", "created_at"]


@admin.register(AttentionCheck)
class AttentionCheckAdmin(OwnedByResearcherAdmin):
    experiment_path = "participant__room__experiment"
    list_display = ["id", "participant", "round", "expected", "answer", "passed", "created_at"]
    list_filter = ["passed"]


@admin.register(Release)
class ReleaseAdmin(OwnedByResearcherAdmin):
    experiment_path = "participant__room__experiment"
    list_display = ["id", "participant", "code", "waited_seconds", "created_at"]


@admin.register(PageView)
class PageViewAdmin(OwnedByResearcherAdmin):
    experiment_path = "participant__room__experiment"
    list_display = ["id", "participant", "round", "view", "phase", "shown_at"]
    list_filter = ["view"]


@admin.register(SeatTransfer)
class SeatTransferAdmin(OwnedByResearcherAdmin):
    """Seats moved to a new browser (links are made on the room monitor): who issued each, when, and if used.
    Read-only: the record of a seat's moves is the proof deliberation.seats checks."""

    experiment_path = "participant__room__experiment"
    list_display = ["id", "participant", "issued_by", "issued_at", "expires_at", "used_at"]
    readonly_fields = ["participant", "issued_by", "issued_at", "expires_at", "used_at"]
    exclude = ["token_sha256"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
