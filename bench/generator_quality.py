"""Generator quality benchmark: how many of the mediator's statements are usable, on the dev set.

    .venv/bin/python bench/generator_quality.py [--adapter DIR] [--groups K] [--n 16] [--max-new-tokens 96]
        [--seed 0] [--data modeling/data/consensus_dev.jsonl] [--out bench/results/generator_quality.json]

Runs the core of `manage.py evaluate_generator` (modeling/generator_quality.py) over the dev set with
the default generator (SmolLM2-135M-Instruct, transformers, CPU) and, given --adapter, the same base
with that LoRA adapter merged in, on the same per-group seeds. Every (member, candidate) is scored by
the similarity reward model (the site default), candidates are ranked by utilitarian welfare and the
top 4 marked shown; each statement is checked by modeling.generation.quality. The results file holds
the per-candidate rows, per-group counts and a summary per run (usable rate, groups with >= 4 usable
statements, shown statements carrying an injected payload, finish reasons, mean tokens, seconds).

The full dev set (50 groups x 16 candidates) takes a long while on two CPU cores; --groups K runs the
first K groups (a partial run; say so when quoting it). `make bench` runs it in full.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# As in production (transformers_backend sets it too, but only before torch is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from modeling.generation.base import SamplingParams  # noqa: E402
from modeling.generation.config import GeneratorConfig, load_generator  # noqa: E402
from modeling.generation.models import DEFAULT_MODEL_ALIAS, default_cache_dir  # noqa: E402
from modeling.generator_quality import DEFAULT_N, SHOWN_K, evaluate_run  # noqa: E402
from modeling.reward.registry import get_reward_model  # noqa: E402
from modeling.training.consensus_data import dataset_sha256, load_groups  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "generator_quality.json"
DEV_DATA = ROOT / "modeling" / "data" / "consensus_dev.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEV_DATA)
    parser.add_argument("--model", default=DEFAULT_MODEL_ALIAS)
    parser.add_argument("--adapter", type=Path, default=None, help="A LoRA adapter to evaluate next to the base model.")
    parser.add_argument("--groups", type=int, default=None, help="Only the first K groups (a partial run).")
    parser.add_argument("--n", type=int, default=DEFAULT_N)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="Converted-model cache (default ~/.cache/concord).")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    groups = load_groups(args.data)
    if args.groups is not None:
        groups = groups[: args.groups]
    config = GeneratorConfig(backend="transformers", model=args.model, device="cpu",
                             cache_dir=args.cache_dir or default_cache_dir())
    reward_model = get_reward_model("similarity", device="cpu")
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    runs: list[dict[str, Any]] = []
    plan: list[tuple[str, Path | None]] = [("base", None)] + ([("adapter", args.adapter)] if args.adapter else [])
    for label, adapter in plan:
        loading = time.perf_counter()
        # An adapter is verified against the sha256 its training recorded, merged into the base and cached.
        generator = load_generator(replace(config, adapter=str(adapter)) if adapter else config)
        load_seconds = time.perf_counter() - loading
        run = evaluate_run(groups, generator=generator, reward_model=reward_model, n=args.n, shown_k=SHOWN_K,
                           seed=args.seed, sampling=sampling, label=label, on_progress=progress)
        run["load_seconds"] = round(load_seconds, 2)
        if adapter is not None:
            run["adapter"] = str(adapter)
        runs.append(run)

    report = {
        "benchmark": "generator_quality",
        "data": {"path": str(args.data.relative_to(ROOT) if args.data.is_relative_to(ROOT) else args.data),
                 "sha256": dataset_sha256(args.data), "groups": len(groups),
                 "partial": args.groups is not None},
        "settings": {"n": args.n, "shown_k": SHOWN_K, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                     "welfare": "utilitarian", "reward_model": "similarity", "device": "cpu"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for run in runs:
        summary = run["summary"]
        print(f"{run['label']}: usable {summary['usable']}/{summary['candidates']} ({summary['usable_rate']}), "
              f"groups with >= {SHOWN_K} usable {summary[f'groups_with_{SHOWN_K}_usable']}/{summary['groups']}, "
              f"shown carrying an injection {summary['shown_carrying_injection']}, "
              f"finish {summary['finish_reasons']}, mean tokens {summary['mean_completion_tokens']}, "
              f"{summary['seconds']}s")
    print(f"wrote {args.out}")
    failed = sum(run["summary"]["groups_failed"] for run in runs)
    if failed:
        print(f"generation failed for {failed} group(s); see the per-group errors in {args.out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
