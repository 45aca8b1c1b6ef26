"""The admin of experiments (with their arms and allow-lists), the question bank, model versions and exports."""

import re

from django import forms
from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html

from accounts import permissions
from accounts.models import Collaboration
from accounts.permissions import ExperimentChoicesMixin, OwnedByResearcherAdmin
from deliberation.models import AllowedExternalId, Arm, Experiment, GeneratorVersion, Question, RewardModelVersion

from . import services
from .models import DatasetExport, DatasetExportDownload


@admin.register(Question)
class QuestionAdmin(admin.ModelAdmin):
    list_display = ["external_id", "text", "topic", "split"]
    list_filter = ["split", "topic"]
    search_fields = ["external_id", "text", "topic"]


class ArmInline(ExperimentChoicesMixin, admin.TabularInline):
    model = Arm
    extra = 0


class CollaborationInline(ExperimentChoicesMixin, admin.TabularInline):
    """Researchers who share this experiment: viewers see it, editors may also change and export it."""

    model = Collaboration
    extra = 0
    fields = ["user", "role", "created_at"]
    readonly_fields = ["created_at"]


class AllowListInline(ExperimentChoicesMixin, admin.TabularInline):
    model = AllowedExternalId
    extra = 0
    fields = ["external_id", "created_at"]
    readonly_fields = ["created_at"]


def _export_action(fmt: str):
    def action(modeladmin, request, queryset):
        for experiment in queryset.filter(permissions.experiment_filter(request.user, change=True)):
            try:
                export = services.dataset_export_request(experiment=experiment, requested_by=request.user, via="admin", format=fmt)
            except services.ServiceError as error:
                modeladmin.message_user(request, f"{experiment.slug}: {error}", messages.ERROR)
                continue
            url = reverse("exports_page", kwargs={"slug": experiment.slug})
            modeladmin.message_user(request, format_html('Export {} of {} is being written: <a href="{}">follow it here</a>.', export.pk, experiment.slug, url))

    action.__name__ = f"export_dataset_{fmt}"
    return admin.action(description=f"Export dataset ({fmt}, pseudonymised)")(action)


ALLOW_LIST_FILE_MAX_BYTES = 2_000_000


class ExperimentAdminForm(forms.ModelForm):
    add_allowed_external_ids = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 4}),
        help_text="Paste external ids (e.g. Prolific PIDs) to add to the allow-list, one per line or separated by commas.",
    )
    allow_list_file = forms.FileField(
        required=False,
        help_text="Or upload a file of external ids to add: plain text (one per line, or separated by commas), or a CSV "
        "whose header names the column (external_id, participant_id, Participant id, PROLIFIC_PID, pid or id), "
        "e.g. a panel's export. UTF-8, up to 2 MB.",
    )

    def clean_allow_list_file(self) -> list[str]:
        upload = self.cleaned_data.get("allow_list_file")
        if not upload:
            return []
        if upload.size > ALLOW_LIST_FILE_MAX_BYTES:
            raise forms.ValidationError("The file is larger than 2 MB: split it, or paste the ids.")
        try:
            text = upload.read().decode("utf-8-sig")
        except UnicodeDecodeError:
            raise forms.ValidationError("The file is not UTF-8 text (save it as CSV UTF-8 or plain text).") from None
        ids = services.external_ids_from_text(text)
        if not ids:
            raise forms.ValidationError("The file has no external ids.")
        return ids

    class Meta:
        model = Experiment
        fields = "__all__"  # noqa: DJ007 - the admin's fieldsets choose what is shown


@admin.register(Experiment)
class ExperimentAdmin(OwnedByResearcherAdmin):
    form = ExperimentAdminForm
    experiment_path = "pk"
    list_display = ["name", "slug", "status", "group_size", "owner", "created_at", "researcher_links"]
    list_filter = ["status"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    filter_horizontal = ["questions"]
    inlines = [ArmInline, AllowListInline, CollaborationInline]
    actions = [_export_action("csv"), _export_action("jsonl"), _export_action("parquet"), "pause", "resume"]
    fieldsets = [
        (None, {"fields": ["name", "slug", "owner", "status", "description", "consent_text"]}),
        ("Groups and timers", {"fields": ["group_size", "min_group_size", "max_wait_seconds", "opinion_seconds", "rating_seconds", "opinion_min_chars", "opinion_max_chars"]}),
        ("Questions", {"fields": ["questions", "question_split", "question_topic"], "description": "Attach questions, or leave none attached and draw from the whole bank by split and topic."}),
        ("Protocols", {"fields": ["rate_opinions", "attention_check", "assignment_seed"]}),
        ("Habermas Machine protocol", {"fields": ["critique_rounds", "ask_positions"], "description": "Critique-and-revision rounds and positions before and after (docs/habermas-protocol.md). A human mediator is an arm setting."}),
        ("Participants", {"fields": ["require_allow_list", "allow_several_seats_per_browser", "add_allowed_external_ids", "allow_list_file", "completion_code", "completion_url", "release_code", "partial_completion_code"]}),
    ]

    def save_related(self, request, form, formsets, change) -> None:
        super().save_related(request, form, formsets, change)
        pasted = form.cleaned_data.get("add_allowed_external_ids") or ""
        uploaded = form.cleaned_data.get("allow_list_file") or []
        added = services.allow_list_add(experiment=form.instance, external_ids=[*re.split(r"[\s,;]+", pasted), *uploaded])
        if added:
            self.message_user(request, f"Added {added} external ids to the allow-list.")

    @admin.display(description="Researcher pages")
    def researcher_links(self, experiment: Experiment) -> str:
        return format_html(
            '<a href="{}">cohort</a> · <a href="{}">analytics</a> · <a href="{}">exports</a>',
            reverse("cohort_monitor", kwargs={"slug": experiment.slug}),
            reverse("analytics", kwargs={"slug": experiment.slug}),
            reverse("exports_page", kwargs={"slug": experiment.slug}),
        )

    @admin.action(description="Pause (nobody new can join)")
    def pause(self, request, queryset):
        self._set_paused(request, queryset, paused=True)

    @admin.action(description="Resume")
    def resume(self, request, queryset):
        self._set_paused(request, queryset, paused=False)

    def _set_paused(self, request, queryset, *, paused: bool) -> None:
        for experiment in queryset.filter(permissions.experiment_filter(request.user, change=True)):
            try:
                services.experiment_pause(experiment=experiment, paused=paused)
            except services.ServiceError as error:
                self.message_user(request, f"{experiment.slug}: {error}", messages.ERROR)

    def get_readonly_fields(self, request, obj=None):
        # A researcher owns what they create; only a superuser gives an experiment to someone else
        # (an editor cannot make the experiment theirs).
        readonly = list(super().get_readonly_fields(request, obj))
        return readonly if request.user.is_superuser else [*readonly, "owner"]

    def save_model(self, request, obj, form, change) -> None:
        if not change and not request.user.is_superuser:
            obj.owner = request.user
        super().save_model(request, obj, form, change)


@admin.register(Arm)
class ArmAdmin(OwnedByResearcherAdmin):
    list_display = ["name", "experiment", "welfare_method", "welfare_alpha", "welfare_tie_break", "n_candidates", "k_shown", "reward_model", "weight", "compare_with", "exclude_one_opinion", "human_mediator", "mediator_is_researcher"]


@admin.register(RewardModelVersion)
class RewardModelVersionAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "base_model", "dataset_sha256", "created_at"]


@admin.register(GeneratorVersion)
class GeneratorVersionAdmin(admin.ModelAdmin):
    """Generator versions are registered by train_generator; the admin shows their lineage and what used them."""

    list_display = ["name", "training_method", "method", "base_model", "parent", "short_sha256", "loss_after", "created_at"]
    list_filter = ["training_method", "method"]
    search_fields = ["name", "base_model", "sha256", "dataset_sha256"]
    readonly_fields = [f.name for f in GeneratorVersion._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="sha256")
    def short_sha256(self, version: GeneratorVersion) -> str:
        return version.sha256[:12]

    @admin.display(description="Held-out loss after")
    def loss_after(self, version: GeneratorVersion) -> object:
        return version.metrics.get("loss_after", "–")


@admin.register(DatasetExport)
class DatasetExportAdmin(OwnedByResearcherAdmin):
    """The export audit log: read-only, so nobody can rewrite who exported what."""

    list_display = ["id", "experiment", "requested_by", "requested_via", "format", "include_external_ids", "status", "created_at", "download"]
    list_filter = ["status", "format", "include_external_ids"]
    readonly_fields = [f.name for f in DatasetExport._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="File")
    def download(self, export: DatasetExport) -> str:
        if export.status != DatasetExport.Status.DONE:
            return "–"
        return format_html('<a href="{}">zip</a>', reverse("export_download", kwargs={"export_id": export.pk}))


@admin.register(DatasetExportDownload)
class DatasetExportDownloadAdmin(OwnedByResearcherAdmin):
    """Who downloaded which export, when and from where: read-only, like the export log."""

    experiment_path = "export__experiment"
    list_display = ["downloaded_at", "export", "downloaded_by", "include_external_ids", "client_address"]
    list_filter = ["include_external_ids"]
    readonly_fields = [f.name for f in DatasetExportDownload._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
