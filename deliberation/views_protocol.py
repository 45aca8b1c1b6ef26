"""HTTP views of the Habermas Machine protocol's steps (docs/habermas-protocol.md): parse, authorise, call one
service, render. Kept apart from views.py; they share its participant check and responses."""

from __future__ import annotations

from django.http import HttpResponse

from . import services
from .http import HtmxHttpRequest
from .models import Participant
from .views import _after_action, _room_response, participant_action


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
