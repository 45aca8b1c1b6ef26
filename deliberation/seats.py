"""Which seats a browser holds: the proof a participant's requests and socket must show.

A browser holds a seat when its session lists the participant's code (it joined, or redeemed a
researcher's seat-transfer link) *and* it saw every move of that seat: the session also records how
many times the seat had been moved (models.SeatTransfer) when it took the seat. Redeeming a transfer
link moves the seat, so every browser that held it before no longer does. An external id is never
proof on its own (services.participant_join).
"""

from __future__ import annotations

from typing import Any

from .models import Participant, SeatTransfer

SESSION_KEY = "concord_participants"
SEAT_MOVES_KEY = "concord_seat_moves"
# A browser remembers at most this many seats (a demo opened in many windows, several studies).
MAX_SEATS_PER_SESSION = 50


def held_codes(session: Any) -> list[str]:
    """The participant codes this session holds (those it listed, less any moved away since)."""
    codes = list(session.get(SESSION_KEY, []))
    if not codes:
        return []
    seen = session.get(SEAT_MOVES_KEY, {})
    moves = SeatTransfer.objects.moves_by_code(codes)
    return [code for code in codes if moves.get(code, 0) == seen.get(code, 0)]


def holds_seat(session: Any, code: str) -> bool:
    if code not in session.get(SESSION_KEY, []):
        return False
    return SeatTransfer.objects.moves_by_code([code]).get(code, 0) == session.get(SEAT_MOVES_KEY, {}).get(code, 0)


def remember_seat(session: Any, participant: Participant) -> None:
    """Record in `session` that this browser holds `participant`'s seat, as it stands now."""
    codes = [code for code in session.get(SESSION_KEY, []) if code != participant.code]
    codes.append(participant.code)
    codes = codes[-MAX_SEATS_PER_SESSION:]
    moves = SeatTransfer.objects.moves_by_code([participant.code]).get(participant.code, 0)
    seen = {code: count for code, count in session.get(SEAT_MOVES_KEY, {}).items() if code in codes}
    if moves:
        seen[participant.code] = moves
    else:
        seen.pop(participant.code, None)
    session[SESSION_KEY] = codes
    session[SEAT_MOVES_KEY] = seen
