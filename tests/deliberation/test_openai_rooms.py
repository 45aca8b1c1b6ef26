"""An arm on the openai backend mediates its rooms, through the mediation task, against a real server.

The openai backend used to fail every mediation in rooms (the task never passed its base URL) while
its command path worked: this drives the room path users take, with the loopback OpenAI-compatible
server of the generation tests running the real SmolLM2.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deliberation import services
from deliberation.mediator import generator_config, generator_config_for
from deliberation.models import Candidate, Experiment, Round
from deliberation.tasks import mediate_round
from modeling.generation.config import GeneratorConfig
from modeling.generation.models import DEFAULT_MODEL_ALIAS
from modeling.generation.registry import get_generator
from modeling.generation.transformers_backend import TransformersGenerator
from tests.conftest import OPINIONS
from tests.modeling.generation.loopback_server import LoopbackServer


def test_the_openai_backend_gets_its_server_from_the_settings(settings) -> None:
    settings.CONCORD_OPENAI_BASE_URL = "http://127.0.0.1:9/v1"
    settings.CONCORD_OPENAI_API_KEY = "sk-test"
    config = generator_config(backend="openai", model="served-name")
    assert config.backend_options() == {"base_url": "http://127.0.0.1:9/v1", "api_key": "sk-test"}
    assert generator_config(backend="transformers").backend_options() == {}


def test_an_unknown_backend_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known backends: .*openai"):
        GeneratorConfig(backend="nope", model="m").backend_options()


@pytest.fixture
def loopback(settings) -> Iterator[LoopbackServer]:
    generator = get_generator("transformers", DEFAULT_MODEL_ALIAS, device="cpu", cache_dir=settings.CONCORD_MODEL_STORE / "hf-cache")
    assert isinstance(generator, TransformersGenerator)
    with LoopbackServer(generator, served_model_name="smollm2-served") as server:
        yield server


@pytest.mark.real_model
@pytest.mark.django_db
def test_a_round_of_an_openai_arm_is_mediated_through_the_task(experiment: Experiment, loopback: LoopbackServer, settings) -> None:
    settings.CONCORD_OPENAI_BASE_URL = loopback.base_url
    arm = experiment.arms.get()
    arm.generator_backend = "openai"
    arm.generator_model = "smollm2-served"
    arm.save()
    assert generator_config_for(arm).backend_options()["base_url"] == loopback.base_url

    members = [services.participant_join(experiment=experiment, external_id=f"openai-{i}") for i in range(3)]
    for member, text in zip(members, OPINIONS):
        services.opinion_submit(participant=member, text=text)
    round_ = Round.objects.current(room_id=members[0].room_id)
    assert round_.phase == Round.Phase.MEDIATING

    assert mediate_round.apply(args=[round_.pk]).get() == "stored"

    round_.refresh_from_db()
    assert round_.phase == Round.Phase.RATING and not round_.mediation_error
    candidates = list(Candidate.objects.filter(round=round_))
    assert len(candidates) == arm.n_candidates
    assert {c.backend for c in candidates} == {"openai"} and {c.model_id for c in candidates} == {"smollm2-served"}
    assert all(c.text.strip() for c in candidates)
    # The server really answered: one chat completion request for the round's candidates (n per request).
    assert loopback.requests and all(request["model"] == "smollm2-served" for request in loopback.requests)
