"""Fine-tuned adapters shipped in the repository, each pinned by the sha256 of its files.

An adapter directory holds adapter_config.json and adapter_model.safetensors (checked by
modeling.generation.models.verify_adapter against the digest pinned here before every load),
concord-adapter.json (what training recorded) and PROVENANCE.md (base model, dataset hash,
hyper-parameters, metrics, and the one command that reproduces it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ADAPTERS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ShippedAdapter:
    name: str  # also its GeneratorVersion's name
    base_model: str
    sha256: str

    @property
    def path(self) -> Path:
        return ADAPTERS_DIR / self.name


# Filled in by the commit that ships an adapter (with its files and PROVENANCE.md).
SHIPPED: dict[str, ShippedAdapter] = {}
