"""Every write to a room's state goes through these functions.

Each runs inside transaction.atomic, takes keyword-only arguments, locks the rows it moves between
phases (select_for_update), and sends its events and enqueues its tasks (by name, see
deliberation.dispatch) only after commit. The rules they apply (which phase accepts what, who is
still in, when a deadline has passed) are methods of the models.

- joining: arm and question draws, rooms, seats, presence, page views
- phases: opening a round, opinions, deadlines and timers, dropouts, the end of a round
- mediation: claiming a round for the pipeline, progress, storing candidates, failures
- seats: a researcher's one-time link that moves a seat to a new browser
- rating: ratings, rankings, and the rating-phase protocols (preferences, opinion ratings, attention)
- protocol: the Habermas Machine protocol's positions, closing questions and human mediator's statement

This package re-exports the public functions, so callers write `services.opinion_submit(...)`.
"""

from .errors import InvalidInput, JoinRefused, ServiceError, WrongPhase
from .joining import (
    ArmDraw,
    page_view_record,
    participant_join,
    participant_persona_record,
    presence_connect,
    presence_disconnect,
    room_create,
)
from .mediation import (
    MediationInput,
    SourcedResult,
    candidates_store,
    mediation_claim,
    mediation_fail,
    mediation_heartbeat,
    mediation_progress,
)
from .phases import (
    opinion_save_draft,
    opinion_submit,
    room_wait_deadline_fire,
    round_deadline_fire,
    round_finish,
    round_start,
)
from .protocol import (
    closing_submit,
    mediator_statement_submit,
    position_before_submit,
    researcher_mediator_draft_save,
    researcher_mediator_statement_submit,
)
from .rating import (
    attention_check_submit,
    opinion_rating_submit,
    pairwise_preference_submit,
    ranking_submit,
    rating_submit,
)
from .seats import seat_transfer_issue, seat_transfer_redeem

__all__ = [
    "ArmDraw",
    "InvalidInput",
    "JoinRefused",
    "MediationInput",
    "ServiceError",
    "SourcedResult",
    "WrongPhase",
    "attention_check_submit",
    "candidates_store",
    "closing_submit",
    "mediation_claim",
    "mediation_fail",
    "mediation_heartbeat",
    "mediation_progress",
    "mediator_statement_submit",
    "researcher_mediator_draft_save",
    "researcher_mediator_statement_submit",
    "opinion_rating_submit",
    "opinion_save_draft",
    "opinion_submit",
    "page_view_record",
    "pairwise_preference_submit",
    "participant_join",
    "position_before_submit",
    "participant_persona_record",
    "presence_connect",
    "presence_disconnect",
    "ranking_submit",
    "rating_submit",
    "room_create",
    "room_wait_deadline_fire",
    "round_deadline_fire",
    "round_finish",
    "round_start",
    "seat_transfer_issue",
    "seat_transfer_redeem",
]
