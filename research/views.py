"""The researcher pages: experiments, the live cohort, analytics and dataset exports.

Every page asks accounts.permissions which experiments the researcher may see; another
researcher's experiment answers 404, as if it did not exist. Changes (pause, resume, export
requests) and downloads of exports with external ids need the owner or an editor: a viewer gets 403.
"""

from __future__ import annotations

import csv
import io

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import FileResponse, Http404, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from accounts import permissions
from deliberation import ratelimit
from deliberation.http import HtmxHttpRequest
from deliberation.models import Experiment

from . import analytics, analytics_protocol, plots, selectors, services
from .exports import PSEUDONYM_KEY_WARNING, export_for, pseudonyms_reversible
from .models import DatasetExport


@login_required
@require_safe
def researcher_home(request: HtmxHttpRequest) -> HttpResponse:
    experiments = selectors.experiments_for(request.user)
    return render(request, "research/researcher_home.html", {"experiments": experiments})


@login_required
@require_safe
def experiment_detail(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    experiment = get_object_or_404(selectors.experiments_for(request.user), slug=slug)
    join_url = request.build_absolute_uri(reverse("join", kwargs={"slug": experiment.slug}))
    return render(
        request,
        "research/experiment_detail.html",
        {"experiment": experiment, "rooms": selectors.rooms_for_experiment(experiment), "join_url": join_url},
    )


def _own_experiment(request: HtmxHttpRequest, slug: str, *, change: bool = False) -> Experiment:
    # Another researcher's experiment does not exist, as far as this researcher can tell.
    experiment = get_object_or_404(selectors.experiments_for(request.user), slug=slug)
    if change and not permissions.can_change_experiment(request.user, experiment):
        raise PermissionDenied("Only the owner or an editor may change this experiment.")
    return experiment


@login_required
@require_safe
def cohort_monitor(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    experiment = _own_experiment(request, slug)
    template = "research/partials/cohort_body.html" if request.htmx else "research/cohort.html"
    return render(request, template, {"cohort": selectors.cohort_state(experiment)})


@login_required
@require_POST
def experiment_pause(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    experiment = _own_experiment(request, slug, change=True)
    # Explicit actions only: a POST without one (or with another) changes nothing.
    action = request.POST.get("action")
    if action not in ("pause", "resume"):
        return HttpResponseBadRequest("Say action=pause or action=resume.")
    paused = action == "pause"
    try:
        services.experiment_pause(experiment=experiment, paused=paused)
    except services.ServiceError as error:
        messages.error(request, str(error))
    else:
        messages.success(request, "The study is paused: nobody new can join." if paused else "The study is accepting participants again.")
    return redirect("cohort_monitor", slug=experiment.slug)


def _analytics_report(request: HtmxHttpRequest, experiment: Experiment) -> analytics.ExperimentReport:
    # Exclusion rules come as ?exclude=dropouts&exclude=failed_attention...; unknown names are ignored.
    return analytics.experiment_report(experiment, selectors.parse_exclusion_rules(request.GET.getlist("exclude")))


@login_required
@require_safe
def analytics_page(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    experiment = _own_experiment(request, slug)
    report = _analytics_report(request, experiment)
    # The protocol's figures are computed only for an experiment that uses the protocol (one query otherwise).
    protocol = analytics_protocol.report_for(experiment)
    return render(
        request,
        "research/analytics.html",
        {
            "experiment": experiment, "report": report, "rows": analytics.table_rows(report), "charts": analytics.charts(report),
            "protocol_rows": analytics_protocol.protocol_rows(protocol) if protocol is not None else None,
            "rules": [(rule, label, rule in report.analysis.rules) for rule, label in selectors.EXCLUSION_RULES.items()],
            "query": request.GET.urlencode(),
            # The figures are drawn from the analysis just computed and inlined as data URIs (an <img> runs no
            # script), so viewing the page does not compute the analysis again per figure.
            "plots": [(plot, plots.data_uri(report.analysis, plot=plot, title=_plot_title(experiment, report, plot))) for plot in plots.PLOTS],
        },
    )


@login_required
@require_safe
def analytics_csv(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    experiment = _own_experiment(request, slug)
    body = analytics.report_csv(_analytics_report(request, experiment))
    protocol = analytics_protocol.report_for(experiment)
    if protocol is not None:
        out = io.StringIO()
        csv.writer(out).writerows(analytics_protocol.protocol_csv_rows(protocol))
        body += out.getvalue()
    response = HttpResponse(body, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{experiment.slug}-analytics.csv"'
    return response


def _plot_title(experiment: Experiment, report: analytics.ExperimentReport, plot: str) -> str:
    what = "differences between arms" if plot == "forest" else "agreement ratings per arm"
    return f"{experiment.name}: {what} (exclusions: {report.analysis.rules_text})"


@login_required
@require_safe
def analytics_plot(request: HtmxHttpRequest, slug: str, plot: str, fmt: str) -> HttpResponse:
    experiment = _own_experiment(request, slug)
    if plot not in plots.PLOTS or fmt not in plots.FORMATS:
        raise Http404("No such plot.")
    report = _analytics_report(request, experiment)
    title = _plot_title(experiment, report, plot)
    response = HttpResponse(plots.render(report.analysis, plot=plot, fmt=fmt, title=title), content_type=plots.FORMATS[fmt])
    if request.GET.get("download"):
        response["Content-Disposition"] = f'attachment; filename="{experiment.slug}-{plot}.{fmt}"'
    return response


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def exports_page(request: HtmxHttpRequest, slug: str) -> HttpResponse:
    experiment = _own_experiment(request, slug, change=request.method == "POST")
    if request.method == "POST":
        try:
            services.dataset_export_request(
                experiment=experiment, requested_by=request.user, via="web", format=request.POST.get("format", ""),
                include_external_ids=request.POST.get("include_external_ids") == "yes",
            )
        except services.ServiceError as error:
            messages.error(request, str(error))
        else:
            messages.success(request, "The export is being written; this page shows its progress.")
        return redirect("exports_page", slug=experiment.slug)
    template = "research/partials/exports_table.html" if request.htmx else "research/exports.html"
    formats = list(DatasetExport.Format.choices)
    # On a site with the public fallback key, pseudonyms can be mapped back to participants: say so before anyone exports.
    pseudonym_warning = PSEUDONYM_KEY_WARNING if pseudonyms_reversible() else ""
    return render(
        request, template,
        {"experiment": experiment, "exports": selectors.exports_for(experiment), "formats": formats, "pseudonym_warning": pseudonym_warning},
    )


@login_required
@require_safe
def export_download(request: HtmxHttpRequest, export_id: int) -> FileResponse:
    export = selectors.export_visible_to(request.user, export_id)
    if export is None:
        raise Http404("No such export.")
    if export.include_external_ids and not permissions.can_export_external_ids(request.user, export.experiment):
        raise PermissionDenied("Exports with external ids are for the owner and editors of the experiment.")
    path = export_for(export)
    if path is None:
        raise Http404("This export has no file (yet, or any more).")
    if request.method == "GET":  # a HEAD hands over no file
        services.dataset_export_download_record(export=export, downloaded_by=request.user, client_address=ratelimit.client_ip_address(request))
    return FileResponse(path.open("rb"), as_attachment=True, filename=path.name, content_type="application/zip")
