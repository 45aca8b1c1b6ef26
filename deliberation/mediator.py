"""Which generator and reward model a room's arm mediates with, read from the arm and the site settings.

Both the mediation task and the `generate_candidates` command build their generator through
`generator_config`, so a backend's options (the openai backend's server, say) are set in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.conf import settings

from modeling.generation.config import GeneratorConfig, load_generator

from .models import Arm

if TYPE_CHECKING:
    from modeling.generation.base import Generator
    from modeling.reward.base import RewardModel


def generator_config(*, backend: str = "", model: str = "") -> GeneratorConfig:
    """The site's generator configuration, with `backend` and `model` overriding the defaults when given."""
    return GeneratorConfig(
        backend=backend or settings.CONCORD_GENERATOR_BACKEND,
        model=model or settings.CONCORD_GENERATOR_MODEL,
        device=settings.CONCORD_DEVICE,
        cache_dir=settings.CONCORD_MODEL_STORE / "hf-cache",
        openai_base_url=settings.CONCORD_OPENAI_BASE_URL,
        openai_api_key=settings.CONCORD_OPENAI_API_KEY,
    )


def generator_config_for(arm: Arm | None) -> GeneratorConfig:
    if arm is None:
        return generator_config()
    return generator_config(backend=arm.generator_backend, model=arm.generator_model)


def reward_model_for(arm: Arm | None) -> RewardModel:
    from modeling.reward.registry import get_reward_model

    version = arm.reward_model_version if arm is not None and arm.reward_model_version_id else None
    return get_reward_model(
        (arm and arm.reward_model) or settings.CONCORD_REWARD_MODEL,
        embedding_model=settings.CONCORD_EMBEDDING_MODEL,
        version_path=version.path if version is not None else None,
        device=settings.CONCORD_DEVICE,
    )


def load_models(*, arm: Arm | None) -> tuple[Generator, RewardModel]:
    """The arm's generator and reward model (or the site defaults), loaded once per process."""
    return load_generator(generator_config_for(arm)), reward_model_for(arm)
