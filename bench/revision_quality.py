"""Revised vs first statements: how many are usable (modeling.generation.quality), on a few dev groups.

    .venv/bin/python bench/revision_quality.py [--groups 3] [--n 4] [--max-new-tokens 96] [--seed 0]
        [--no-adapter] [--out bench/results/revision_quality.json]

For each dev group (modeling/data/consensus_dev.jsonl, the iid_test split: evaluation only) the mediator runs
twice, as a two-round Habermas Machine protocol does (docs/habermas-protocol.md): first from the opinions,
then, with the first round's top-welfare statement as the previous statement and one critique per member,
a revision. The dev set has no critiques (only the training seed has revision examples), so each member's
critique is a fixed sentence built from their own opinion: "It leaves out my main point: <the opinion's
first sentence>." That is a stand-in for what a member would write, and says so in the results file.
The generator is the site default (SmolLM2-135M-Instruct on CPU) with the shipped adapter merged in unless
--no-adapter; the reward model is the similarity model; welfare utilitarian. Every candidate of both rounds
is checked by modeling.generation.quality.assess against the group's question and opinions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from modeling.adapters import SHIPPED  # noqa: E402
from modeling.generation.base import SamplingParams  # noqa: E402
from modeling.generation.config import GeneratorConfig, load_generator  # noqa: E402
from modeling.generation.models import DEFAULT_MODEL_ALIAS  # noqa: E402
from modeling.generation.prompts import RevisionContext, derive_seed  # noqa: E402
from modeling.generation.quality import assess  # noqa: E402
from modeling.pipeline import mediate  # noqa: E402
from modeling.reward.registry import get_reward_model  # noqa: E402
from modeling.training.consensus_data import dataset_sha256, load_groups  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "revision_quality.json"
DEV_DATA = ROOT / "modeling" / "data" / "consensus_dev.jsonl"
CRITIQUE_TEMPLATE = "It leaves out my main point: {point}."


def template_critique(opinion: str) -> str:
    first = re.split(r"(?<=[.!?])\s", opinion.strip(), maxsplit=1)[0].strip().rstrip(".!?")
    return CRITIQUE_TEMPLATE.format(point=first)


def _rows(result: Any, question: str, opinions: list[str]) -> list[dict[str, Any]]:
    rank_of = {index: position + 1 for position, index in enumerate(result.welfare.ranking)}
    rows = []
    for index, candidate in enumerate(result.candidates):
        verdict = assess(candidate.text, question=question, opinions=opinions)
        rows.append({
            "text": candidate.text, "usable": verdict.usable, "reasons": sorted(verdict.reasons), "rank": rank_of.get(index),
            "completion_tokens": candidate.completion_tokens, "finish_reason": candidate.finish_reason,
        })
    return rows


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    usable = sum(row["usable"] for row in rows)
    reasons: dict[str, int] = {}
    for row in rows:
        for reason in row["reasons"]:
            reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "candidates": len(rows), "usable": usable, "usable_rate": round(usable / len(rows), 3) if rows else None,
        "top_ranked_usable": sum(1 for row in rows if row["rank"] == 1 and row["usable"]),
        "reasons": dict(sorted(reasons.items())),
        "mean_completion_tokens": round(sum(row["completion_tokens"] for row in rows) / len(rows), 1) if rows else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=3)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-adapter", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "var" / "models" / "hf-cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    groups = load_groups(DEV_DATA)[: args.groups]
    adapter = "" if args.no_adapter else str(SHIPPED[DEFAULT_MODEL_ALIAS].path)
    config = GeneratorConfig(backend="transformers", model=DEFAULT_MODEL_ALIAS, device="cpu", cache_dir=args.cache_dir, adapter=adapter,
                             adapter_sha256="" if args.no_adapter else SHIPPED[DEFAULT_MODEL_ALIAS].sha256)
    generator = load_generator(config)
    reward_model = get_reward_model("similarity", device="cpu")
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    started = time.perf_counter()
    first_rows: list[dict[str, Any]] = []
    revised_rows: list[dict[str, Any]] = []
    per_group = []
    for group in groups:
        opinions = list(group.opinions)
        seed = derive_seed("revision-quality", args.seed, group.group_id) % (2**31)
        first = mediate(question=group.question, opinions=opinions, n=args.n, seed=seed, generator=generator, reward_model=reward_model,
                        sampling=sampling)
        previous = first.candidates[first.welfare.ranking[0]].text
        critiques = [template_critique(opinion) for opinion in opinions]
        revised = mediate(question=group.question, opinions=opinions, n=args.n, seed=seed + 1, generator=generator,
                          reward_model=reward_model, sampling=sampling,
                          revision=RevisionContext(previous_statement=previous, critiques=critiques))
        these_first, these_revised = _rows(first, group.question, opinions), _rows(revised, group.question, opinions)
        first_rows += these_first
        revised_rows += these_revised
        per_group.append({"group_id": group.group_id, "question": group.question, "critiques": critiques,
                          "first": these_first, "revised": these_revised})
        print(f"{group.group_id}: first {sum(r['usable'] for r in these_first)}/{len(these_first)} usable, "
              f"revised {sum(r['usable'] for r in these_revised)}/{len(these_revised)}", file=sys.stderr, flush=True)
    report = {
        "benchmark": "revision_quality",
        "data": {"path": str(DEV_DATA.relative_to(ROOT)), "sha256": dataset_sha256(DEV_DATA), "groups": len(groups), "partial": True},
        "critiques": f"template per member: {CRITIQUE_TEMPLATE!r} (the dev set has no critiques)",
        "settings": {"n": args.n, "max_new_tokens": args.max_new_tokens, "seed": args.seed, "model": DEFAULT_MODEL_ALIAS,
                     "adapter": adapter and Path(adapter).name, "reward_model": "similarity", "welfare": "utilitarian", "device": "cpu"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "seconds": round(time.perf_counter() - started, 1),
        "summary": {"first": _summary(first_rows), "revised": _summary(revised_rows)},
        "groups": per_group,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(report["summary"], indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
