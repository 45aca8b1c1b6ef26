"""The training pages: start a run (data, method, base version), follow it, list the model versions and
point an arm at one. Thin: they parse, call research.training and render research.training_selectors.

Training needs the owner or an editor of every experiment whose data it uses; pointing an arm at a
version needs the owner or an editor of the arm's experiment (accounts.permissions). A run on another
researcher's data answers 404, like a missing one.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from accounts import permissions
from deliberation.http import HtmxHttpRequest
from deliberation.models import Arm, GeneratorVersion
from deliberation.services import ServiceError
from modeling.training.methods import TRAINING_METHODS
from modeling.welfare import WELFARE_LABELS

from . import selectors, training, training_selectors
from .models import TrainingRun

_PARAM_FIELDS = tuple(training.DEFAULT_PARAMS)


@login_required
@require_http_methods(["GET", "POST"])
def training_page(request: HtmxHttpRequest) -> HttpResponse:
    experiments = training_selectors.changeable_experiments(request.user)
    if request.method == "POST":
        chosen = list(experiments.filter(pk__in=[value for value in request.POST.getlist("experiments") if value.isdigit()]))
        if len(chosen) != len(request.POST.getlist("experiments")):
            raise PermissionDenied("Only the owner or an editor of an experiment may train on its data.")
        parent_id = request.POST.get("parent", "")
        parent = get_object_or_404(GeneratorVersion, pk=int(parent_id)) if parent_id.isdigit() else None
        kind = request.POST.get("kind", "")
        try:
            run = training.training_run_start(
                user=request.user,
                kind=kind,
                method=request.POST.get("method", "") if kind == TrainingRun.Kind.GENERATOR else "",
                experiments=chosen,
                parent=parent if kind == TrainingRun.Kind.GENERATOR else None,
                params={name: request.POST.get(name, "") for name in _PARAM_FIELDS},
            )
        except ServiceError as error:
            messages.error(request, str(error))
            return redirect("training_page")
        messages.success(request, "Training has started; this page follows it.")
        return redirect("training_run", run_id=run.pk)
    context: dict[str, Any] = {
        "experiments": experiments,
        "versions": GeneratorVersion.objects.all(),
        "methods": list(TRAINING_METHODS.items()),
        "welfare_methods": list(WELFARE_LABELS.items()),
        "defaults": training.DEFAULT_PARAMS,
        "runs": training_selectors.training_runs_for(request.user)[:50],
    }
    return render(request, "research/training.html", context)


@login_required
@require_GET
def training_run_page(request: HtmxHttpRequest, run_id: int) -> HttpResponse:
    run = training_selectors.training_run_visible_to(request.user, run_id)
    if run is None:
        raise Http404("No such training run.")
    template = "research/partials/training_run_status.html" if request.htmx else "research/training_run.html"
    context = {
        "run": run,
        "waiting_for_worker": training_selectors.training_run_waiting_for_worker(run),
        "can_retry": training_selectors.training_run_retryable_by(request.user, run),
    }
    return render(request, template, context)


@login_required
@require_POST
def training_run_retry(request: HtmxHttpRequest, run_id: int) -> HttpResponse:
    run = training_selectors.training_run_visible_to(request.user, run_id)
    if run is None:
        raise Http404("No such training run.")
    try:
        retry = training.training_run_retry(user=request.user, run=run)
    except ServiceError as error:
        messages.error(request, str(error))
        return redirect("training_run", run_id=run.pk)
    messages.success(request, f"Run {run.pk} started again as run {retry.pk}, with the same data and options.")
    return redirect("training_run", run_id=retry.pk)


@login_required
@require_GET
def versions_page(request: HtmxHttpRequest) -> HttpResponse:
    return render(
        request,
        "research/versions.html",
        {
            "rows": training_selectors.generator_versions_overview(request.user),
            "arms": training_selectors.changeable_arms(request.user),
            "versions": GeneratorVersion.objects.all(),
            "may_evaluate": training_selectors.may_evaluate(request.user),
            "evaluation_groups": training.EVALUATION_DEFAULTS["groups"],
        },
    )


@login_required
@require_POST
def version_evaluate(request: HtmxHttpRequest, version_id: int) -> HttpResponse:
    version = get_object_or_404(GeneratorVersion, pk=version_id)
    try:
        run = training.generator_evaluation_start(user=request.user, version=version, params={"groups": request.POST.get("groups", "")})
    except ServiceError as error:
        messages.error(request, str(error))
        return redirect("versions_page")
    messages.success(request, f"Evaluating {version.name} on the dev groups; this page follows it.")
    return redirect("training_run", run_id=run.pk)


@login_required
@require_POST
def arm_generator_version(request: HtmxHttpRequest, arm_id: int) -> HttpResponse:
    # An arm of an experiment the researcher cannot see does not exist, as far as they can tell.
    arm = get_object_or_404(Arm.objects.filter(experiment__in=selectors.experiments_for(request.user)), pk=arm_id)
    if not permissions.can_change_experiment(request.user, arm.experiment):
        raise PermissionDenied("Only the owner or an editor may change this experiment's arms.")
    version_id = request.POST.get("version", "")
    version = get_object_or_404(GeneratorVersion, pk=int(version_id)) if version_id.isdigit() else None
    training.arm_generator_version_set(user=request.user, arm=arm, version=version)
    messages.success(request, f"{arm} now generates with {version.name if version else 'the site default'}.")
    return redirect("versions_page")
