"""HTTP views of the Habermas Machine protocol's steps (docs/habermas-protocol.md): parse, authorise, call one
service, render. Kept apart from views.py; they share its participant check and responses."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from . import selectors, services
from .http import HtmxHttpRequest
from .models import Participant, Round
from .views import _after_action, _monitored_room, _room_response, participant_action


@participant_action("submit", limit_setting="RATE_LIMIT_SUBMIT_PER_PARTICIPANT")
def position_submit(request: HtmxHttpRequest, participant: Participant) -> HttpResponse:
    try:
        services.position_before_submit(
            participant=participant, position=request.POST.get("position"), strength=request.POST.get("strength")
        )
    except services.ServiceError as error:
        return _room_response(request, participant, error=str(error), status=422 if not request.htmx else 200)
    return _after_action(request, participant)


@participant_action("submit", limit_setting="RATE_LIMIT_SUBMIT_PER_PARTICIPANT")
def closing_submit(request: HtmxHttpRequest, participant: Participant) -> HttpResponse:
    try:
        services.closing_submit(
            participant=participant,
            preferred=request.POST.get("preferred"),
            position=request.POST.get("position"),
            strength=request.POST.get("strength"),
        )
    except services.ServiceError as error:
        return _room_response(request, participant, error=str(error), status=422 if not request.htmx else 200)
    return _after_action(request, participant)


@participant_action("submit", limit_setting="RATE_LIMIT_SUBMIT_PER_PARTICIPANT")
def mediator_statement_submit(request: HtmxHttpRequest, participant: Participant) -> HttpResponse:
    try:
        services.mediator_statement_submit(participant=participant, text=request.POST.get("text", ""))
    except services.ServiceError as error:
        # Keep what they wrote, as a refused opinion is kept.
        services.opinion_save_draft(participant=participant, text=request.POST.get("text", ""))
        return _room_response(request, participant, error=str(error), status=422 if not request.htmx else 200)
    return _after_action(request, participant)


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def room_mediate(request: HtmxHttpRequest, room_id: int) -> HttpResponse:
    """A researcher-mediated room: the owner or an editor reads the members' opinions (and critiques) and writes the
    group statement, with the round's timer; the same material and service as a member mediator's page."""
    room = _monitored_room(request, room_id, change=True)
    round_ = Round.objects.select_related("mediator").current(room_id=room.pk)
    seat = round_.mediator
    if seat is None or not seat.researcher_seat:
        raise Http404("A researcher does not mediate this room.")
    if request.method == "POST":
        text = request.POST.get("text", "")
        try:
            services.researcher_mediator_statement_submit(room=room, researcher=request.user, text=text)
        except services.ServiceError as error:
            services.researcher_mediator_draft_save(room=room, text=text)
            messages.error(request, str(error))
        else:
            messages.success(request, "The statement is in: the members are rating it.")
        return redirect("room_mediate", room_id=room.pk)
    statement_in = round_.candidates.filter(author=seat).exists()
    return render(request, "deliberation/room_mediate.html", {"room": room, "state": selectors.room_state_for(seat), "statement_in": statement_in})
