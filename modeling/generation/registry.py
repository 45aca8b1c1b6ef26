"""One generator per (backend, model, device, options) per process.

Loading a model takes seconds to minutes and gigabytes of memory, so a worker loads it
on the first task and every later task (in any thread) reuses it. Each key has its own
lock: two threads asking for the same model wait for one load, while a different
model can load at the same time.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from .base import Generator
from .openai_backend import OpenAIGenerator
from .standin import StandInGenerator
from .transformers_backend import TransformersGenerator
from .vllm_backend import VLLMGenerator

# Importing these modules is cheap: torch, transformers and vllm are imported on construction.
BACKENDS: dict[str, type] = {
    TransformersGenerator.backend: TransformersGenerator,
    VLLMGenerator.backend: VLLMGenerator,
    OpenAIGenerator.backend: OpenAIGenerator,
    # Load benchmark only (bench/load.py): an arm must name it; it is never the site default.
    StandInGenerator.backend: StandInGenerator,
}

# What a site may choose as its default (CONCORD_GENERATOR_BACKEND): every backend but the stand-in.
DEFAULT_CAPABLE_BACKENDS: tuple[str, ...] = tuple(name for name in BACKENDS if name != StandInGenerator.backend)

_CacheKey = tuple[str, str, str, str, tuple[tuple[str, str], ...]]

_registry_lock = threading.Lock()
_key_locks: dict[_CacheKey, threading.Lock] = {}
_generators: dict[_CacheKey, Generator] = {}


def _cache_key(backend: str, model: str, device: str, cache_dir: Path | None, options: dict[str, Any]) -> _CacheKey:
    # repr() makes unhashable option values (dataclasses, lists) usable in the key.
    frozen_options = tuple(sorted((name, repr(value)) for name, value in options.items()))
    return (backend, model, device, str(cache_dir) if cache_dir is not None else "", frozen_options)


def get_generator(
    backend: str, model: str, *, device: str = "auto", cache_dir: Path | None = None, **options: Any
) -> Generator:
    """The process-wide generator for this backend and model, created on first use.

    `options` go to the backend's constructor (e.g. base_url/api_key for "openai",
    num_threads for "transformers", max_model_len for "vllm") and are part of the key.
    """
    generator_class = BACKENDS.get(backend)
    if generator_class is None:
        raise ValueError(f"Unknown generation backend {backend!r}; known backends: {', '.join(sorted(BACKENDS))}.")
    key = _cache_key(backend, model, device, cache_dir, options)
    with _registry_lock:
        cached = _generators.get(key)
        if cached is not None:
            return cached
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        cached = _generators.get(key)
        if cached is None:
            cached = generator_class(model, device=device, cache_dir=cache_dir, **options)
            with _registry_lock:
                _generators[key] = cached
        return cached


def clear_generators() -> None:
    """Forget every cached generator (tests; freeing memory after an experiment)."""
    with _registry_lock:
        _generators.clear()
        _key_locks.clear()
