"""The one place that turns a generator configuration into a loaded generator.

A room's mediation task and the `generate_candidates` command both load generators; building the
backend's constructor options in two places is how the `openai` backend came to fail in rooms
(the task never passed its base URL). Both now describe what they want as a `GeneratorConfig` and
call `load_generator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Generator
from .registry import BACKENDS, get_generator


@dataclass(frozen=True)
class GeneratorConfig:
    backend: str
    model: str
    device: str = "auto"
    # Converted checkpoints (transformers, vllm) are cached here.
    cache_dir: Path | None = None
    # The openai backend's server: any OpenAI-compatible endpoint (vllm serve, a hosted API).
    openai_base_url: str = ""
    openai_api_key: str = ""
    # A fine-tuned adapter directory (transformers backend only; see modeling/training/sft.py), and
    # the sha256 it must have (blank: the digest its training recorded in concord-adapter.json).
    # The model name may carry it instead: "<model>+adapter:<directory>".
    adapter: str = ""
    adapter_sha256: str = ""

    def backend_options(self) -> dict[str, Any]:
        """Constructor options of this backend beyond (model, device, cache_dir)."""
        if self.backend not in BACKENDS:
            raise ValueError(f"Unknown generation backend {self.backend!r}; known backends: {', '.join(sorted(BACKENDS))}.")
        if self.adapter and self.backend != "transformers":
            raise ValueError(f"Adapters are loaded by the transformers backend only, not {self.backend!r}.")
        if self.backend == "openai":
            return {"base_url": self.openai_base_url, "api_key": self.openai_api_key}
        if self.adapter:
            # Only when set, so a plain configuration keeps its registry key.
            return {"adapter": self.adapter, "adapter_sha256": self.adapter_sha256 or None}
        return {}


def load_generator(config: GeneratorConfig) -> Generator:
    """The process-wide generator for `config` (loaded once per process, see registry.get_generator)."""
    return get_generator(
        config.backend, config.model, device=config.device, cache_dir=config.cache_dir, **config.backend_options()
    )
