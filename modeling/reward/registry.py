"""Reward models by registry name, loaded once per process.

Arm.reward_model and settings.CONCORD_REWARD_MODEL hold these names. Loading
weights takes seconds, and in-process mediation tasks run in threads, so each
distinct configuration is built once and shared (models are safe to call from
several threads: they serialise their own forward passes).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from .base import RewardModel
from .constant import ConstantRewardModel

RewardModelFactory = Callable[..., RewardModel]


def _build_similarity(
    *,
    embedding_model: str,
    version_path: str | None,
    device: str,
    question_aware: bool = False,
    low: float | None = None,
    high: float | None = None,
    allow_hub: bool = False,
) -> RewardModel:
    from .similarity import SimilarityConfig, SimilarityRewardModel, get_encoder

    encoder = get_encoder(embedding_model, device=device, allow_hub=allow_hub)
    return SimilarityRewardModel(encoder, SimilarityConfig(question_aware=question_aware, low=low, high=high))


def _build_cross_encoder(*, embedding_model: str, version_path: str | None, device: str) -> RewardModel:
    from .cross_encoder import CrossEncoderRewardModel

    if not version_path:
        raise ValueError(
            "the cross-encoder reward model needs version_path: the directory of trained weights "
            "(RewardModelVersion.path; train one with manage.py train_reward_model)"
        )
    # embedding_model is ignored: the saved directory holds its own encoder.
    return CrossEncoderRewardModel.load(version_path, device=device)


def _build_stance_head(*, embedding_model: str, version_path: str | None, device: str, allow_hub: bool = False) -> RewardModel:
    """The shipped stance head (sha256 pinned in stance_head.SHIPPED_SHA256), or a trained one in version_path.

    The head was trained on one encoder's embeddings: its config.json names the encoder and
    head.npz (checksummed) how many of its bottom layers were kept; that encoder is used
    whatever CONCORD_EMBEDDING_MODEL says.
    """
    from .similarity import get_encoder
    from .stance_head import StanceHeadRewardModel, load_shipped_or_directory

    head, config, version = load_shipped_or_directory(version_path)
    encoder = get_encoder(str(config.get("encoder", embedding_model)), device=device, allow_hub=allow_hub, layers=head.encoder_layers)
    train_mean = config.get("train_mean")
    return StanceHeadRewardModel(encoder, head, version, float(train_mean) if train_mean is not None else None)


def _build_constant(*, embedding_model: str, version_path: str | None, device: str) -> RewardModel:
    return ConstantRewardModel()


REWARD_MODELS: dict[str, RewardModelFactory] = {
    "similarity": _build_similarity,
    "cross-encoder": _build_cross_encoder,
    # The default: a small head on frozen MiniLM embeddings, shipped in modeling/reward/shipped/stance-head/.
    "stance-head": _build_stance_head,
    # No reward model: every candidate ties, so the first K written are shown (an experiment's baseline arm).
    ConstantRewardModel.name: _build_constant,
}

# Reward models whose predictions carry no information about the participants (a constant): nothing to
# report an accuracy for, and nothing to explain a ranking by. Only their tie-break orders the statements.
UNINFORMATIVE_REWARD_MODELS: frozenset[str] = frozenset({ConstantRewardModel.name})


def reward_model_is_informative(name: str) -> bool:
    """Whether predictions recorded under this registry name carry information (False for the `none` baseline)."""
    return name not in UNINFORMATIVE_REWARD_MODELS


_CACHE: dict[tuple[Any, ...], RewardModel] = {}
_CACHE_LOCK = threading.Lock()


def _cache_key(name: str, embedding_model: str, version_path: str | None, device: str, opts: dict[str, Any]) -> tuple[Any, ...]:
    return (
        name,
        embedding_model,
        version_path,
        device,
        tuple(sorted((key, repr(value)) for key, value in opts.items())),
    )


def get_reward_model(
    name: str,
    *,
    embedding_model: str = "all-minilm-l6-v2",
    version_path: str | None = None,
    device: str = "auto",
    **opts: Any,
) -> RewardModel:
    """The reward model registered as `name`, built once per process per configuration.

    embedding_model: encoder alias, local path or cached hub id (similarity).
    version_path: directory of trained weights (models that need them, e.g. cross-encoder).
    opts: model-specific options, e.g. question_aware=True for similarity.
    """
    factory = REWARD_MODELS.get(name)
    if factory is None:
        raise ValueError(f"unknown reward model {name!r}; known: {', '.join(sorted(REWARD_MODELS))}")
    key = _cache_key(name, embedding_model, version_path, device, opts)
    with _CACHE_LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = factory(embedding_model=embedding_model, version_path=version_path, device=device, **opts)
            _CACHE[key] = model
        return model


def clear_cache() -> None:
    """Forget loaded models (tests; freeing memory after an evaluation)."""
    with _CACHE_LOCK:
        _CACHE.clear()
