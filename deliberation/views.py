"""HTTP views: parse, authorise, call one service, render."""

from __future__ import annotations

import functools
from collections.abc import Callable

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST, require_safe

from accounts import permissions

from . import ratelimit, selectors, services
from .http import HtmxHttpRequest
from .inputs import clean_text
from .models import Experiment, Participant, Room
from .seats import SESSION_KEY as SESSION_KEY  # re-exported: where tests have always found it
from .seats import held_codes, holds_seat, remember_seat

EXTERNAL_ID_PARAMS = ("PROLIFIC_PID", "participant_label")


def _take_seat(request: HtmxHttpRequest, participant: Participant) -> None:
    # A new session key on taking a seat (as Django's login does): a key planted in this browser before
    # (session fixation) is not the one that now proves the seat. The session's data moves with it.
    request.session.cycle_key()
    remember_seat(request.session, participant)


def participant_for_request(request: HtmxHttpRequest, code: str) -> Participant:
    """The participant behind this URL, if this browser holds their seat (deliberation.seats); else 404."""
    if not holds_seat(request.session, code):
        raise Http404("No such participant in this browser session.")
    participant = selectors.participant_by_code(code)
    if participant is None:
        raise Http404("No such participant.")
    return participant


def participant_action(scope: str, *, limit_setting: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """A participant's POST: the participant resolves first (a code this browser does not hold is a 404
    that counts nothing), then the request counts against that participant's own limit.

    The key is the participant, reached only through a session that holds their code: a stranger who
    posts to someone else's URL is refused before any counter moves, so they cannot use up (or lock
    out) another participant's budget, and made-up codes make no keys in the limiter's cache.
    """

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @require_POST
        @functools.wraps(view)
        def wrapped(request: HtmxHttpRequest, code: str, **kwargs: object) -> HttpResponse:
            participant = participant_for_request(request, code)
            if not ratelimit.hit(scope=scope, key=f"participant:{participant.code}", limit=getattr(settings, limit_setting)):
                return ratelimit.too_many_requests()
            return view(request, participant, **kwargs)

        return wrapped

    return decorator


def _external_id(request: HtmxHttpRequest) -> str:
    for name in EXTERNAL_ID_PARAMS:
        value = request.GET.get(name) or request.POST.get(name)
        value = clean_text(value).strip()
        if value:
            return value
    return ""


@require_safe
def home(request: HtmxHttpRequest) -> HttpResponse:
    experiments = Experiment.objects.filter(status=Experiment.Status.ACTIVE).order_by("name")
    return render(request, "home.html", {"experiments": experiments})


@require_http_methods(["GET", "HEAD", "POST"])
@ratelimit.rate_limited_by_address("join", limit_setting="RATE_LIMIT_JOIN_PER_IP")
def join(request: HtmxHttpRequest, slug: str, room_code: str | None = None) -> HttpResponse:
    experiment = get_object_or_404(Experiment, slug=slug)
    room = get_object_or_404(Room, code=room_code, experiment=experiment) if room_code else None
    external_id = _external_id(request)
    context = {"experiment": experiment, "room": room, "external_id": external_id, "error": ""}
    if request.method == "POST":
        if request.POST.get("consent") != "yes":
            context["error"] = "Please tick the box to give your consent, or close this page if you do not wish to take part."
            return render(request, "deliberation/consent.html", context, status=400)
        try:
            participant = services.participant_join(
                experiment=experiment, external_id=external_id, room=room, browser_codes=held_codes(request.session)
            )
        except services.JoinRefused as refusal:
            context["error"] = str(refusal)
            return render(request, "deliberation/join_refused.html", context, status=403)
        _take_seat(request, participant)
        return redirect("participant", code=participant.code)
    return render(request, "deliberation/consent.html", context)


@require_http_methods(["GET", "HEAD", "POST"])
@ratelimit.rate_limited_by_address("join", limit_setting="RATE_LIMIT_JOIN_PER_IP")
def seat_resume(request: HtmxHttpRequest, token: str) -> HttpResponse:
    """A researcher's one-time link that moves a seat to this browser. GET only asks (link previews in mail
    and chat apps fetch pages, and must not use the link up); the button's POST redeems it."""
    if request.method != "POST":
        return render(request, "deliberation/seat_resume.html", {"token": token})
    try:
        participant = services.seat_transfer_redeem(token=token)
    except services.JoinRefused as refusal:
        return render(request, "deliberation/seat_resume.html", {"token": token, "error": str(refusal)}, status=410)
    _take_seat(request, participant)
    return redirect("participant", code=participant.code)


def _room_response(request: HtmxHttpRequest, participant: Participant, *, error: str = "", status: int = 200) -> HttpResponse:
    state = selectors.room_state_for(participant)
    # Page timings: which screen the participant was shown, and when (repeats are not recorded twice).
    if request.method != "HEAD":  # a HEAD shows nobody anything
        services.page_view_record(participant_id=participant.pk, view=state.view, round_id=state.round.pk, phase=state.round.phase)
    template = "deliberation/partials/main.html" if request.htmx else "deliberation/room.html"
    return render(request, template, {"state": state, "error": error}, status=status)


@require_safe
def participant_page(request: HtmxHttpRequest, code: str) -> HttpResponse:
    participant = participant_for_request(request, code)
    return _room_response(request, participant)


@participant_action("submit", limit_setting="RATE_LIMIT_SUBMIT_PER_PARTICIPANT")
def opinion_submit(request: HtmxHttpRequest, participant: Participant) -> HttpResponse:
    try:
        services.opinion_submit(participant=participant, text=request.POST.get("text", ""))
    except services.ServiceError as error:
        # Keep what they wrote, so a refused opinion is never lost.
        services.opinion_save_draft(participant=participant, text=request.POST.get("text", ""))
        return _room_response(request, participant, error=str(error), status=422 if not request.htmx else 200)
    return _after_action(request, participant)


@participant_action("draft", limit_setting="RATE_LIMIT_DRAFT_PER_PARTICIPANT")
def opinion_draft(request: HtmxHttpRequest, participant: Participant) -> HttpResponse:
    services.opinion_save_draft(participant=participant, text=request.POST.get("text", ""))
    return HttpResponse(status=204)


@participant_action("submit", limit_setting="RATE_LIMIT_SUBMIT_PER_PARTICIPANT")
def rating_submit(request: HtmxHttpRequest, participant: Participant, candidate_id: int) -> HttpResponse:
    try:
        services.rating_submit(
            participant=participant,
            candidate_id=candidate_id,
            agreement=request.POST.get("agreement"),
            quality=request.POST.get("quality"),
        )
    except services.ServiceError as error:
        return _room_response(request, participant, error=str(error), status=422 if not request.htmx else 200)
    return _after_action(request, participant)


@participant_action("submit", limit_setting="RATE_LIMIT_SUBMIT_PER_PARTICIPANT")
def ranking_submit(request: HtmxHttpRequest, participant: Participant) -> HttpResponse:
    positions: dict[int, object] = {}
    for key, value in request.POST.items():
        if key.startswith("rank_"):
            try:
                positions[int(key.removeprefix("rank_"))] = value
            except ValueError:
                return HttpResponseBadRequest("Malformed ranking.")
    try:
        services.ranking_submit(participant=participant, positions=positions)
    except services.ServiceError as error:
        return _room_response(request, participant, error=str(error), status=422 if not request.htmx else 200)
    return _after_action(request, participant)


@participant_action("submit", limit_setting="RATE_LIMIT_SUBMIT_PER_PARTICIPANT")
def preference_submit(request: HtmxHttpRequest, participant: Participant) -> HttpResponse:
    try:
        first, second = int(request.POST.get("candidate_a", "")), int(request.POST.get("candidate_b", ""))
    except ValueError:
        return HttpResponseBadRequest("Malformed pair.")
    try:
        services.pairwise_preference_submit(
            participant=participant, candidate_a_id=first, candidate_b_id=second, preferred_id=request.POST.get("preferred")
        )
    except services.ServiceError as error:
        return _room_response(request, participant, error=str(error), status=422 if not request.htmx else 200)
    return _after_action(request, participant)


@participant_action("submit", limit_setting="RATE_LIMIT_SUBMIT_PER_PARTICIPANT")
def opinion_rating_submit(request: HtmxHttpRequest, participant: Participant, opinion_id: int) -> HttpResponse:
    try:
        services.opinion_rating_submit(participant=participant, opinion_id=opinion_id, agreement=request.POST.get("agreement"))
    except services.ServiceError as error:
        return _room_response(request, participant, error=str(error), status=422 if not request.htmx else 200)
    return _after_action(request, participant)


@participant_action("submit", limit_setting="RATE_LIMIT_SUBMIT_PER_PARTICIPANT")
def attention_submit(request: HtmxHttpRequest, participant: Participant) -> HttpResponse:
    try:
        services.attention_check_submit(participant=participant, answer=request.POST.get("answer"))
    except services.ServiceError as error:
        return _room_response(request, participant, error=str(error), status=422 if not request.htmx else 200)
    return _after_action(request, participant)


def _after_action(request: HtmxHttpRequest, participant: Participant) -> HttpResponse:
    if request.htmx:
        return _room_response(request, participant)
    return redirect("participant", code=participant.code)


# --- The room monitor (researchers) -------------------------------------------------


def _monitored_room(request: HtmxHttpRequest, room_id: int, *, change: bool = False) -> Room:
    room = get_object_or_404(Room.objects.select_related("experiment"), pk=room_id)
    if not permissions.can_monitor(request.user, room):
        # Another researcher's room does not exist, as far as this researcher can tell (as a missing one).
        raise Http404("No such room.")
    if change and not permissions.can_change_experiment(request.user, room.experiment):
        raise PermissionDenied("Only the owner or an editor may change this experiment's rooms.")
    return room


@login_required
@require_safe
def room_monitor(request: HtmxHttpRequest, room_id: int) -> HttpResponse:
    room = _monitored_room(request, room_id)
    return render(request, "deliberation/monitor.html", {"monitor": selectors.monitor_state(room)})


@login_required
@require_POST
def seat_transfer_issue(request: HtmxHttpRequest, participant_id: int) -> HttpResponse:
    """A researcher moves a participant's seat to a new browser: a one-time link, shown once, for the
    researcher to send them. Redeeming it ends the seat in every other browser. Needs change rights."""
    participant = get_object_or_404(Participant.objects.select_related("room__experiment"), pk=participant_id)
    room = _monitored_room(request, participant.room_id, change=True)
    token = services.seat_transfer_issue(participant=participant, issued_by=request.user)
    link = request.build_absolute_uri(reverse("seat_resume", kwargs={"token": token}))
    return render(request, "deliberation/seat_transfer_link.html", {"room": room, "participant": participant, "link": link})


@login_required
@require_POST
def room_start(request: HtmxHttpRequest, room_id: int) -> HttpResponse:
    room = _monitored_room(request, room_id, change=True)
    try:
        services.round_start(room=room)
    except services.ServiceError as error:
        messages.error(request, str(error))
    return redirect("room_monitor", room_id=room.pk)
