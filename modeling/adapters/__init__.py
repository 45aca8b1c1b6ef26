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


# By the base model each adapter was trained on (CONCORD_GENERATOR_MODEL picks it).
SHIPPED: dict[str, ShippedAdapter] = {
    "smollm2-135m-instruct": ShippedAdapter(
        name="consensus-sft-v1",
        base_model="smollm2-135m-instruct",
        sha256="87eb39caadc5dbe5d816e239716c3bfd25538ff6c47335306c82a5dcd405e3c3",
    ),
}
