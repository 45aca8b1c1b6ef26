"""The generator versions an experiment used, with their ancestors: the lineage part of the export
(research.exports' generator_versions table). Kept apart so the export's table declaration stays short."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from deliberation.models import Arm, Candidate, Experiment, GeneratorVersion


def versions_used(experiment: Experiment) -> list[GeneratorVersion]:
    """Versions its arms name or its candidates cite, then their parents, grandparents, ...; oldest first."""
    ids = set(Arm.objects.filter(experiment=experiment, generator_version__isnull=False).values_list("generator_version_id", flat=True))
    ids |= set(
        Candidate.objects.filter(round__room__experiment=experiment, generator_version__isnull=False)
        .values_list("generator_version_id", flat=True)
        .distinct()
    )
    found: dict[int, GeneratorVersion] = {}
    frontier = ids
    while frontier:
        batch = list(GeneratorVersion.objects.filter(pk__in=frontier).select_related("parent"))
        found.update((version.pk, version) for version in batch)
        frontier = {v.parent_id for v in batch if v.parent_id is not None and v.parent_id not in found}
    return sorted(found.values(), key=lambda version: (version.created_at, version.pk))


def lineage_rows(experiment: Experiment) -> Iterator[tuple[Any, ...]]:
    for version in versions_used(experiment):
        yield (
            version.name, version.parent.name if version.parent else None, version.training_method, version.method,
            version.base_model, version.base_model_sha256, version.sha256, version.dataset_sha256,
            json.dumps(version.params, sort_keys=True, default=str), json.dumps(version.metrics, sort_keys=True, default=str),
            version.created_at,
        )
