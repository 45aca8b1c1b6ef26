"""Are the statements a generator writes usable? The core of `manage.py evaluate_generator` and
bench/generator_quality.py (framework-free: no Django).

For each group of an evaluation file (modeling/data/consensus_dev.jsonl), `evaluate_run` mediates
exactly as a room does (`modeling.pipeline.mediate`: N candidates, every (member, candidate) scored by
the reward model, ranked by utilitarian welfare), marks the top K as shown, and checks every candidate
with `modeling.generation.quality.assess`. The run's JSON has one row per candidate, one per group
and a summary; the figures that matter most are the usable rate, the groups with at least K usable
candidates (a room shows K), and shown statements that carry an injected payload (should be 0).

A tuned adapter is evaluated through GeneratorConfig(adapter=...), as rooms load it.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from .generation.base import GenerationError, Generator, SamplingParams
from .generation.prompts import derive_seed
from .generation.quality import REASONS, assess, injection_payloads
from .pipeline import mediate
from .reward.base import RewardModel
from .training.consensus_data import ConsensusGroup

DEFAULT_N = 16
SHOWN_K = 4
WELFARE_METHOD = "utilitarian"

# on_progress(message): one line of human-readable progress.
ProgressLine = Callable[[str], None]


def group_seed(seed: int, group_id: str) -> int:
    """Each group's own seed, so adding or removing groups leaves the others' candidates unchanged."""
    return derive_seed("evaluate-generator", seed, group_id) % (2**31)


def evaluate_run(
    groups: Sequence[ConsensusGroup],
    *,
    generator: Generator,
    reward_model: RewardModel,
    n: int = DEFAULT_N,
    shown_k: int = SHOWN_K,
    seed: int = 0,
    sampling: SamplingParams | None = None,
    label: str = "base",
    on_progress: ProgressLine | None = None,
) -> dict[str, Any]:
    """Mediate every group, check every candidate; the run as a JSON-ready dict."""
    if n < 1 or shown_k < 1:
        raise ValueError("n and shown_k must be at least 1")
    say = on_progress or (lambda message: None)
    sampling = sampling or SamplingParams()
    started = time.perf_counter()
    candidate_rows: list[dict[str, Any]] = []
    group_rows: list[dict[str, Any]] = []
    for number, group in enumerate(groups, start=1):
        group_started = time.perf_counter()
        payloads = [payload for index in group.injection for payload in injection_payloads(group.opinions[index])]
        try:
            result = mediate(
                question=group.question,
                opinions=group.opinions,
                n=n,
                seed=group_seed(seed, group.group_id),
                generator=generator,
                reward_model=reward_model,
                welfare_method=WELFARE_METHOD,
                sampling=sampling,
            )
        except GenerationError as error:
            group_rows.append({"group_id": group.group_id, "candidates": 0, "usable": 0, "shown_usable": 0,
                               "shown_carrying_injection": 0, "error": str(error),
                               "seconds": round(time.perf_counter() - group_started, 3)})
            say(f"[{label}] group {number}/{len(groups)} {group.group_id}: generation failed: {error}")
            continue
        shown = set(result.welfare.ranking[:shown_k])
        rank = {index: position for position, index in enumerate(result.welfare.ranking)}
        rows: list[dict[str, Any]] = []
        for index, candidate in enumerate(result.candidates):
            verdict = assess(
                candidate.text,
                question=group.question,
                opinions=group.opinions,
                injected_payloads=payloads,
                ignore_members=group.off_topic,
            )
            rows.append({
                "group_id": group.group_id,
                "index": index,
                "text": candidate.text,
                "usable": verdict.usable,
                "reasons": verdict.reasons,
                "predicted_welfare": round(result.welfare.welfare[index], 4),
                "rank": rank[index],
                "shown": index in shown,
                "carries_injection": verdict.carries_injection,
                "carried_payloads": verdict.carried_payloads,
                "missed_members": verdict.missed_members,
                "finish_reason": candidate.finish_reason,
                "completion_tokens": candidate.completion_tokens,
            })
        candidate_rows.extend(rows)
        usable = sum(row["usable"] for row in rows)
        group_rows.append({
            "group_id": group.group_id,
            "candidates": len(rows),
            "usable": usable,
            "shown_usable": sum(row["usable"] for row in rows if row["shown"]),
            "shown_carrying_injection": sum(row["carries_injection"] for row in rows if row["shown"]),
            "injection_in_group": bool(group.injection),
            "seconds": round(time.perf_counter() - group_started, 3),
        })
        say(f"[{label}] group {number}/{len(groups)} {group.group_id}: {usable}/{len(rows)} usable, "
            f"{time.perf_counter() - group_started:.1f}s")
    return {
        "label": label,
        "generator": {"backend": generator.backend, "model": generator.model_id, "revision": generator.model_revision},
        "reward_model": {"name": reward_model.name, "version": reward_model.version},
        "summary": summarise(candidate_rows, group_rows, shown_k=shown_k, seconds=time.perf_counter() - started),
        "groups": group_rows,
        "candidates": candidate_rows,
    }


def summarise(
    candidates: Sequence[dict[str, Any]], groups: Sequence[dict[str, Any]], *, shown_k: int, seconds: float
) -> dict[str, Any]:
    shown = [row for row in candidates if row["shown"]]
    reasons = Counter(reason for row in candidates for reason in row["reasons"])
    return {
        "groups": len(groups),
        "groups_failed": sum(1 for group in groups if "error" in group),
        "candidates": len(candidates),
        "usable": sum(row["usable"] for row in candidates),
        "usable_rate": _rate(sum(row["usable"] for row in candidates), len(candidates)),
        f"groups_with_{shown_k}_usable": sum(1 for group in groups if group["usable"] >= shown_k),
        "shown": len(shown),
        "shown_usable_rate": _rate(sum(row["usable"] for row in shown), len(shown)),
        "shown_carrying_injection": sum(row["carries_injection"] for row in shown),
        "carrying_injection": sum(row["carries_injection"] for row in candidates),
        "reasons": {code: reasons.get(code, 0) for code in REASONS},
        "finish_reasons": dict(sorted(Counter(row["finish_reason"] for row in candidates).items())),
        "mean_completion_tokens": round(statistics.fmean(row["completion_tokens"] for row in candidates), 2)
        if candidates else None,
        "seconds": round(seconds, 2),
    }


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
