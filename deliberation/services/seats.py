"""Moving a seat to a new browser: a researcher issues a one-time link, the participant redeems it."""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone

from .. import events
from ..models import Participant, SeatTransfer
from .errors import JoinRefused

SEAT_TRANSFER_VALID_FOR = timedelta(hours=24)


def _token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def seat_transfer_issue(*, participant: Participant, issued_by: Any) -> str:
    """A one-time token that moves `participant`'s seat to whichever browser redeems it (within 24 hours).

    The caller (the researcher's view) has checked that `issued_by` may change the experiment. Earlier
    unredeemed links of the same participant stop working: only the newest one the researcher sent counts.
    """
    token = secrets.token_urlsafe(32)
    with transaction.atomic():
        SeatTransfer.objects.filter(participant=participant, used_at__isnull=True).delete()
        SeatTransfer.objects.create(
            participant=participant,
            token_sha256=_token_sha256(token),
            issued_by=issued_by if getattr(issued_by, "is_authenticated", False) else None,
            expires_at=timezone.now() + SEAT_TRANSFER_VALID_FOR,
        )
    return token


def seat_transfer_redeem(*, token: str) -> Participant:
    """Use a transfer link: the seat becomes the redeeming browser's. Refused when unknown, used or expired."""
    with transaction.atomic():
        transfer = SeatTransfer.objects.select_for_update(of=("self",)).select_related("participant").filter(token_sha256=_token_sha256(token)).first()
        now = timezone.now()
        if transfer is None or not transfer.is_redeemable(now):
            raise JoinRefused("This link has been used already or has expired. Please ask the researchers for a new one.")
        transfer.used_at = now
        transfer.save(update_fields=["used_at"])
        events.send_on_commit(events.SeatMoved(room_id=transfer.participant.room_id, participant_id=transfer.participant_id))
    return transfer.participant
