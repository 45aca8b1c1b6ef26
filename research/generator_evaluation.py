"""Evaluate a generator on a hand-written evaluation set: one path for `manage.py evaluate_generator` and
for the evaluation runs researchers start from the versions page (research.training).

Each configuration (the tuned version or adapter, and with compare_base its untuned base on the same
seeds) mediates every group through mediator.load_generator, as rooms load theirs, and every candidate
is checked by modeling.generation.quality (the core: modeling/generator_quality.py). The report is JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from django.conf import settings

from deliberation import mediator
from deliberation.models import GeneratorVersion
from modeling.generation.base import SamplingParams
from modeling.generation.config import GeneratorConfig
from modeling.generator_quality import SHOWN_K, evaluate_run
from modeling.training.consensus_data import ConsensusGroup, dataset_sha256

# The evaluation set a run from the versions page uses: the dev groups (never trained on).
DEFAULT_EVALUATION_DATA = Path(settings.BASE_DIR) / "modeling" / "data" / "consensus_dev.jsonl"

ProgressLine = Callable[[str], None]


def generator_evaluate(
    *,
    groups: Sequence[ConsensusGroup],
    data: Path,
    n: int,
    seed: int,
    max_new_tokens: int,
    backend: str,
    version: GeneratorVersion | None = None,
    model: str = "",
    adapter: Path | None = None,
    compare_base: bool = False,
    on_progress: ProgressLine | None = None,
) -> dict[str, Any]:
    """Evaluate `version` (or `adapter` on `model`, or the base model alone); the report as a JSON-ready dict.
    Raises GenerationError or ModelResolutionError when a model cannot be loaded or run."""
    say = on_progress or (lambda message: None)
    base = mediator.generator_config(backend=backend, model=(version.base_model if version else model) or "")
    tuned: GeneratorConfig | None
    if version is not None:
        tuned = mediator.version_config(version, backend=backend)
    elif adapter is not None:
        tuned = mediator.generator_config(backend=backend, model=base.model, adapter=str(adapter))
    else:
        tuned = None
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    reward_model = mediator.reward_model_for(None)
    plan: list[tuple[str, GeneratorConfig]] = []
    if tuned is None or compare_base:
        plan.append(("base", base))
    if tuned is not None:
        plan.append((version.name if version else "adapter", tuned))
    runs = []
    for label, config in plan:
        say(f"[{label}] loading {config.backend}:{config.model}" + (f" + {config.adapter}" if config.adapter else ""))
        # Through mediator.load_generator, as rooms load theirs (tests swap in the stand-in there).
        generator = mediator.load_generator(config)
        run = evaluate_run(
            groups, generator=generator, reward_model=reward_model, n=n, shown_k=SHOWN_K,
            seed=seed, sampling=sampling, label=label, on_progress=say,
        )  # fmt: skip
        if config.adapter:
            run["adapter"] = config.adapter
        runs.append(run)
        say(f"[{label}] {json.dumps(headline(run['summary']))}")
    return {
        "data": {"path": str(data), "sha256": dataset_sha256(data), "groups": len(groups)},
        "settings": {"n": n, "shown_k": SHOWN_K, "max_new_tokens": max_new_tokens, "seed": seed, "welfare": "utilitarian"},
        "runs": runs,
    }


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary's few figures worth a line: usable rates, injections, finish reasons, length and time."""
    keys = ("usable_rate", "shown_usable_rate", "shown_carrying_injection", "finish_reasons", "mean_completion_tokens", "seconds")
    return {key: summary[key] for key in keys} | {k: v for k, v in summary.items() if k.startswith("groups_with_")}
