"""Which generator and reward model an arm mediates with, read from the arm and the site settings.

Both the mediation task and the commands build their generator through `generator_config`, so a
backend's options (the openai backend's server, say) and a generator version's adapter are set in one
place. An arm's GeneratorVersion is loaded by the transformers backend as its adapter (verified by
sha256, merged at load and cached); the openai backend asks its server for the version's name (the
served model name: serve the adapter, or merged weights, under that name).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from modeling.adapters import SHIPPED
from modeling.generation.config import GeneratorConfig, load_generator

from .models import Arm, GeneratorVersion

if TYPE_CHECKING:
    from modeling.generation.base import Generator
    from modeling.reward.base import RewardModel


def generator_config(*, backend: str = "", model: str = "", adapter: str = "", adapter_sha256: str = "") -> GeneratorConfig:
    """The site's generator configuration, with `backend` and `model` overriding the defaults when given."""
    return GeneratorConfig(
        backend=backend or settings.CONCORD_GENERATOR_BACKEND,
        model=model or settings.CONCORD_GENERATOR_MODEL,
        device=settings.CONCORD_DEVICE,
        cache_dir=settings.CONCORD_MODEL_STORE / "hf-cache",
        openai_base_url=settings.CONCORD_OPENAI_BASE_URL,
        openai_api_key=settings.CONCORD_OPENAI_API_KEY,
        adapter=adapter,
        adapter_sha256=adapter_sha256,
    )


def version_config(version: GeneratorVersion, *, backend: str = "", served_name: str = "") -> GeneratorConfig:
    """How to generate with `version`: its adapter over its base (transformers), or its served name (openai)."""
    backend = backend or settings.CONCORD_GENERATOR_BACKEND
    if backend == "openai":
        return generator_config(backend=backend, model=served_name or version.name)
    if backend != "transformers":
        raise ImproperlyConfigured(
            f"Generator version {version.name!r} is an adapter; the {backend} backend cannot load it here. "
            "Use the transformers backend, or serve the merged weights and use the openai backend."
        )
    return generator_config(backend=backend, model=version.base_model, adapter=version.path, adapter_sha256=version.sha256)


def default_generator_version() -> GeneratorVersion | None:
    """The version the site generates with when an arm names none (CONCORD_GENERATOR_ADAPTER).

    A shipped or local adapter is registered as a GeneratorVersion on first use (from its training
    record), so the candidates it writes cite it like any trained version.
    """
    choice = settings.CONCORD_GENERATOR_ADAPTER.strip()
    if choice in ("", "none") or settings.CONCORD_GENERATOR_BACKEND != "transformers":
        return None  # adapters are loaded by the transformers backend; a served model is chosen by name
    if choice == "shipped":
        # The adapter shipped for the site's model, if the repository ships one for it (SmolLM2 by default).
        shipped = SHIPPED.get(settings.CONCORD_GENERATOR_MODEL)
        if shipped is None:
            return None
        name, path, sha256, base = shipped.name, shipped.path, shipped.sha256, shipped.base_model
    else:
        path = Path(choice).expanduser().resolve()
        manifest_path = path / "concord-adapter.json"
        if not manifest_path.is_file():
            raise ImproperlyConfigured(f"CONCORD_GENERATOR_ADAPTER={choice!r}: no concord-adapter.json in {path}.")
        manifest = json.loads(manifest_path.read_text())
        name, sha256, base = f"local-{manifest['adapter_sha256'][:12]}", manifest["adapter_sha256"], manifest["base_model"]
    record = _training_record(path)
    version, created = GeneratorVersion.objects.get_or_create(
        sha256=sha256,
        defaults={
            "name": name,
            "path": str(path),
            "base_model": base,
            "base_model_sha256": record.get("base_model_sha256") or "",
            "method": GeneratorVersion.Method.LORA,
            "dataset_sha256": record.get("dataset_sha256", ""),
            "params": record.get("hyperparameters", {}),
            "metrics": {key: record[key] for key in ("loss_before", "loss_after", "train_rows", "seconds") if key in record},
        },
    )
    if not created and version.path != str(path):
        # The same weights, found at a new place (the checkout moved): load them from there.
        version.path = str(path)
        version.save(update_fields=["path"])
    return version


def _training_record(path: Path) -> dict:
    manifest = path / "concord-adapter.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else {}


def generator_version_for(arm: Arm | None) -> GeneratorVersion | None:
    """The version an arm generates with: its own, else (when it names no other model) the site's default."""
    if arm is not None and arm.generator_version_id:
        return arm.generator_version
    if arm is not None and (arm.generator_model or (arm.generator_backend and arm.generator_backend != "transformers")):
        return None  # the arm chose another model or backend: the site's adapter is not for it
    return default_generator_version()


def generator_config_for(arm: Arm | None) -> GeneratorConfig:
    version = generator_version_for(arm)
    if version is not None:
        return version_config(version, backend=arm.generator_backend if arm else "", served_name=arm.generator_model if arm else "")
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
