from django.contrib import admin

from .models import (
    Arm,
    Candidate,
    Experiment,
    Opinion,
    Participant,
    PredictedAgreement,
    Presentation,
    Question,
    Ranking,
    Rating,
    RewardModelVersion,
    Room,
    Round,
)


class OwnedByResearcher(admin.ModelAdmin):
    """Researchers see only what belongs to their own experiments; staff superusers see all."""

    experiment_path = "experiment"

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        if request.user.is_superuser:
            return queryset
        return queryset.filter(**{f"{self.experiment_path}__owner": request.user})


@admin.register(Question)
class QuestionAdmin(admin.ModelAdmin):
    list_display = ["external_id", "text", "topic", "split"]
    list_filter = ["split", "topic"]
    search_fields = ["external_id", "text", "topic"]


class ArmInline(admin.TabularInline):
    model = Arm
    extra = 0


@admin.register(Experiment)
class ExperimentAdmin(OwnedByResearcher):
    experiment_path = "pk"
    list_display = ["name", "slug", "status", "group_size", "owner", "created_at"]
    list_filter = ["status"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    filter_horizontal = ["questions"]
    inlines = [ArmInline]

    def get_queryset(self, request):
        queryset = admin.ModelAdmin.get_queryset(self, request)
        return queryset if request.user.is_superuser else queryset.filter(owner=request.user)


@admin.register(Arm)
class ArmAdmin(OwnedByResearcher):
    list_display = ["name", "experiment", "welfare_method", "welfare_alpha", "n_candidates", "k_shown", "reward_model"]


class ParticipantInline(admin.TabularInline):
    model = Participant
    extra = 0
    fields = ["label", "external_id", "consented_at", "connections", "dropped_out_at", "finished_at"]
    readonly_fields = fields


@admin.register(Room)
class RoomAdmin(OwnedByResearcher):
    list_display = ["id", "experiment", "arm", "status", "capacity", "created_at"]
    list_filter = ["status", "experiment"]
    inlines = [ParticipantInline]


@admin.register(Participant)
class ParticipantAdmin(OwnedByResearcher):
    experiment_path = "room__experiment"
    list_display = ["id", "label", "room", "external_id", "consented_at", "dropped_out_at", "finished_at"]
    search_fields = ["external_id", "code"]
    list_filter = ["room__experiment"]


@admin.register(Round)
class RoundAdmin(OwnedByResearcher):
    experiment_path = "room__experiment"
    list_display = ["id", "room", "index", "phase", "outcome", "mediation_attempts", "created_at"]
    list_filter = ["phase", "outcome"]


@admin.register(Opinion)
class OpinionAdmin(OwnedByResearcher):
    experiment_path = "round__room__experiment"
    list_display = ["id", "round", "participant", "text", "created_at"]


@admin.register(Candidate)
class CandidateAdmin(OwnedByResearcher):
    experiment_path = "round__room__experiment"
    list_display = ["id", "round", "index", "rank", "welfare", "shown", "backend", "model_id", "latency_ms"]
    list_filter = ["shown", "backend"]


@admin.register(PredictedAgreement)
class PredictedAgreementAdmin(OwnedByResearcher):
    experiment_path = "candidate__round__room__experiment"
    list_display = ["id", "candidate", "participant", "score", "reward_model", "reward_model_version"]


@admin.register(Presentation)
class PresentationAdmin(OwnedByResearcher):
    experiment_path = "participant__room__experiment"
    list_display = ["id", "participant", "candidate", "position"]


@admin.register(Rating)
class RatingAdmin(OwnedByResearcher):
    experiment_path = "participant__room__experiment"
    list_display = ["id", "participant", "candidate", "agreement", "quality", "created_at"]


@admin.register(Ranking)
class RankingAdmin(OwnedByResearcher):
    experiment_path = "participant__room__experiment"
    list_display = ["id", "participant", "round", "order", "created_at"]


@admin.register(RewardModelVersion)
class RewardModelVersionAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "base_model", "dataset_sha256", "created_at"]
