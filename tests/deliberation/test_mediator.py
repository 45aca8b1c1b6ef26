"""Which generator an arm mediates with: its generator version, the site's default adapter, or the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from deliberation import mediator
from deliberation.models import Experiment, GeneratorVersion
from modeling.adapters import SHIPPED

pytestmark = pytest.mark.django_db


def _version(**fields: object) -> GeneratorVersion:
    defaults: dict[str, object] = {
        "name": "consensus-v1", "base_model": "smollm2-135m-instruct", "path": "/adapters/consensus-v1", "sha256": "a" * 64,
    }
    return GeneratorVersion.objects.create(**{**defaults, **fields})


def test_an_arm_with_a_version_loads_its_adapter_over_its_base(experiment: Experiment, settings) -> None:
    settings.CONCORD_GENERATOR_BACKEND = "transformers"
    arm = experiment.arms.get()
    arm.generator_version = _version()
    arm.save()
    config = mediator.generator_config_for(arm)
    assert (config.backend, config.model, config.adapter, config.adapter_sha256) == (
        "transformers", "smollm2-135m-instruct", "/adapters/consensus-v1", "a" * 64,
    )
    assert config.backend_options() == {"adapter": "/adapters/consensus-v1", "adapter_sha256": "a" * 64}
    assert mediator.generator_version_for(arm) == arm.generator_version


def test_an_openai_arm_asks_its_server_for_the_version_by_name(experiment: Experiment, settings) -> None:
    settings.CONCORD_OPENAI_BASE_URL = "http://127.0.0.1:9/v1"
    arm = experiment.arms.get()
    arm.generator_backend = "openai"
    arm.generator_version = _version()
    arm.save()
    config = mediator.generator_config_for(arm)
    assert (config.backend, config.model, config.adapter) == ("openai", "consensus-v1", "")
    arm.generator_model = "served-under-another-name"
    assert mediator.generator_config_for(arm).model == "served-under-another-name"


def test_a_backend_that_cannot_load_adapters_is_refused_clearly(experiment: Experiment) -> None:
    arm = experiment.arms.get()
    arm.generator_backend = "vllm"
    arm.generator_version = _version()
    with pytest.raises(ImproperlyConfigured, match="vllm backend cannot load it"):
        mediator.generator_config_for(arm)


def test_without_a_version_or_site_adapter_the_base_model_generates(experiment: Experiment, settings) -> None:
    settings.CONCORD_GENERATOR_ADAPTER = "none"
    arm = experiment.arms.get()
    assert mediator.generator_version_for(arm) is None
    assert mediator.generator_config_for(arm).adapter == ""


def test_a_site_adapter_is_registered_once_from_its_training_record(experiment: Experiment, settings, tmp_path: Path) -> None:
    adapter = tmp_path / "site-adapter"
    adapter.mkdir()
    record = {"adapter_sha256": "b" * 64, "base_model": "smollm2-135m-instruct", "dataset_sha256": "c" * 64,
              "loss_before": 3.1, "loss_after": 1.9, "hyperparameters": {"lora_r": 8}}
    (adapter / "concord-adapter.json").write_text(json.dumps(record))
    settings.CONCORD_GENERATOR_ADAPTER = str(adapter)
    arm = experiment.arms.get()
    first = mediator.generator_version_for(arm)
    again = mediator.generator_version_for(arm)
    assert first is not None and again == first and GeneratorVersion.objects.count() == 1
    assert (first.sha256, first.dataset_sha256, first.metrics["loss_after"]) == ("b" * 64, "c" * 64, 1.9)
    assert mediator.generator_config_for(arm).adapter == str(adapter.resolve())
    # An arm that chose another model is not given the site's adapter.
    arm.generator_model = "some/other-model"
    assert mediator.generator_version_for(arm) is None


def test_the_shipped_adapter_is_the_default_for_its_base_model_only(settings) -> None:
    settings.CONCORD_GENERATOR_ADAPTER = "shipped"
    settings.CONCORD_GENERATOR_BACKEND = "transformers"
    settings.CONCORD_GENERATOR_MODEL = "smollm2-135m-instruct"
    version = mediator.default_generator_version()
    assert version is not None and version.name == "consensus-sft-v1"
    assert version.sha256 == SHIPPED["smollm2-135m-instruct"].sha256 and version.path == str(SHIPPED["smollm2-135m-instruct"].path)
    assert version.metrics["loss_after"] < version.metrics["loss_before"]
    assert mediator.default_generator_version() == version and GeneratorVersion.objects.count() == 1
    # Another base model has no shipped adapter: it generates untuned; a served model is chosen by name.
    settings.CONCORD_GENERATOR_MODEL = "some/other-model"
    assert mediator.default_generator_version() is None
    settings.CONCORD_GENERATOR_MODEL = "smollm2-135m-instruct"
    settings.CONCORD_GENERATOR_BACKEND = "openai"
    assert mediator.default_generator_version() is None


def test_the_shipped_adapter_files_match_their_pinned_sha256_and_size_limit() -> None:
    from modeling.generation.models import adapter_digest, verify_adapter

    for shipped in SHIPPED.values():
        digest, size = adapter_digest(shipped.path)
        assert digest == shipped.sha256, f"{shipped.path} changed after it was pinned"
        assert size <= 10 * 1024 * 1024
        assert verify_adapter(shipped.path, shipped.sha256).sha256 == shipped.sha256
        assert (shipped.path / "PROVENANCE.md").is_file()
        record = json.loads((shipped.path / "concord-adapter.json").read_text())
        assert record["adapter_sha256"] == shipped.sha256 and record["base_model"] == shipped.base_model


def test_a_tampered_shipped_adapter_is_refused(tmp_path: Path) -> None:
    import shutil

    from modeling.generation.models import ModelIntegrityError, verify_adapter

    shipped = SHIPPED["smollm2-135m-instruct"]
    copy = tmp_path / "tampered"
    shutil.copytree(shipped.path, copy)
    weights = copy / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch"):
        verify_adapter(copy, shipped.sha256)
