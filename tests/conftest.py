"""Shared fixtures: personas, and a browser-like client bound to one participant."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from django.test import Client

from deliberation import services
from deliberation.models import Experiment, Participant
from deliberation.views import SESSION_KEY
from tests.factories import ExperimentFactory, UserFactory

# Keep generation short in tests: the real model, fewer tokens.
os.environ.setdefault("CONCORD_MAX_NEW_TOKENS", "40")

OPINIONS = [
    "Taxes on the very rich should rise, because inequality erodes trust and public services need funding.",
    "Raising taxes on the rich drives investment and talented people abroad; we should cut waste instead.",
    "A modest increase on the top incomes is fair, as long as the money goes to schools and hospitals.",
    "I am unsure: closing loopholes matters more than raising the headline rate on the wealthy.",
    "The rich already pay most of the tax; higher rates would just reward clever accountants.",
]


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup):
    """pytest-django's, plus: websocket render threads keep a connection each; close them before the
    test databases are dropped, or PostgreSQL refuses to drop a database still in use."""
    yield
    from deliberation.consumers import close_render_connections

    close_render_connections()


@pytest.fixture(autouse=True)
def _fake_generation_unless_real_model(request, monkeypatch) -> None:
    """The default test run mediates with the stand-in generator: instant, deterministic, and it honours the
    whole Generator contract (n candidates, shuffled opinion orders, prompts, tokens), so everything after it
    (the real similarity reward model, welfare, storage, presentation, rating) runs as in production.

    Tests marked `real_model` load the real default generator (SmolLM2): one per path that users take
    (services, the Celery task, the cohort command, the browser), so the real model is still exercised.
    Only the site-default backend is replaced; an arm that names another backend (openai, vllm) gets it.
    """
    if request.node.get_closest_marker("real_model"):
        return
    from deliberation import mediator
    from modeling.generation.standin import StandInGenerator

    real_load = mediator.load_generator

    def load_generator(config):
        if config.backend == "transformers":
            return StandInGenerator(config.model)
        return real_load(config)

    monkeypatch.setattr(mediator, "load_generator", load_generator)


@pytest.fixture(autouse=True)
def _test_settings(settings) -> None:
    settings.CONCORD_MAX_NEW_TOKENS = 40
    # Every test client shares one address; tests of the limits turn them back on.
    settings.RATE_LIMIT_JOIN_PER_IP = 0
    settings.RATE_LIMIT_SUBMIT_PER_PARTICIPANT = 0


@dataclass
class Persona:
    participant: Participant
    client: Client


def client_for(participant: Participant) -> Client:
    """A browser session that joined as `participant` (as the join view would leave it)."""
    client = Client(enforce_csrf_checks=False)
    session = client.session
    session[SESSION_KEY] = [participant.code]
    session.save()
    return client


@pytest.fixture
def researcher(db):
    return UserFactory(username="owner")


@pytest.fixture
def outsider_researcher(db):
    return UserFactory(username="outsider")


@pytest.fixture
def experiment(db, researcher) -> Experiment:
    return ExperimentFactory(owner=researcher, slug="study", group_size=3)


@pytest.fixture
def group(experiment) -> list[Persona]:
    """Three participants who joined (and so consented) and filled a room."""
    members = [services.participant_join(experiment=experiment, external_id=f"pid-{i}") for i in range(3)]
    return [Persona(participant=p, client=client_for(p)) for p in members]


@pytest.fixture
def participant(group) -> Persona:
    return group[0]


@pytest.fixture
def other_participant(group) -> Persona:
    return group[1]


@pytest.fixture
def outsider(experiment) -> Persona:
    """A participant of another room of another experiment."""
    other_experiment = ExperimentFactory(slug="other-study", group_size=3)
    stranger = services.participant_join(experiment=other_experiment, external_id="stranger")
    return Persona(participant=stranger, client=client_for(stranger))
