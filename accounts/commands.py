"""Management commands that touch an experiment act as a named researcher, under the same rule as the pages.

A shell on the server is not a login: a command that reads, exports, fills or changes an experiment
says whom it acts for with `--as-user USERNAME`, and finds only experiments that user may change
(accounts.permissions: the owner, an editor, or a superuser). The operator who means to act on any
experiment names a superuser. The export audit log records the user as the requester.

Commands that touch no experiment (the question bank without --experiment, model versions, training
and evaluation) need no user.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError, CommandParser
from django.db.models import Q, QuerySet

from .permissions import experiment_filter

AS_USER_HELP = (
    "The researcher this command acts for (required): it touches only experiments they may change "
    "(owner, editor or superuser), as the researcher pages do, and is recorded as theirs."
)


def add_as_user_argument(parser: CommandParser, *, required: bool = True) -> None:
    parser.add_argument("--as-user", dest="as_user", required=required, metavar="USERNAME", help=AS_USER_HELP)


def acting_user(username: str | None) -> Any:
    if not username:
        raise CommandError("Say whom this command acts for: --as-user USERNAME (a researcher who may change the experiment, or a superuser).")
    user = get_user_model()._default_manager.filter(username=username, is_active=True).first()
    if user is None:
        raise CommandError(f"No active user {username!r}.")
    return user


def experiment_for_command(experiments: QuerySet, *, lookup: Q, described: str, username: str | None) -> tuple[Any, Any]:
    """(experiment, user): the experiment matching `lookup` that `username` may change; CommandError otherwise."""
    user = acting_user(username)
    matching = experiments.filter(lookup)
    found = matching.filter(experiment_filter(user, change=True)).first()
    if found is not None:
        return found, user
    if matching.exists():
        raise CommandError(
            f"{user.get_username()} may not change the experiment {described}: only its owner, an editor "
            "(accounts.Collaboration) or a superuser may."
        )
    raise CommandError(f"No experiment {described}.")
