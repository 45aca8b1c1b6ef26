"""What a service refuses with: the message is shown to the person who made the request."""

from __future__ import annotations


class ServiceError(Exception):
    """A request that cannot be carried out; the message is shown to the person who made it."""


class JoinRefused(ServiceError):
    pass


class WrongPhase(ServiceError):
    pass


class InvalidInput(ServiceError):
    pass
