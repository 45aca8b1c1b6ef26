"""Statements from the base generator and a fine-tuned adapter, side by side, on held-out groups.

    .venv/bin/python bench/sft_samples.py --adapter var/sft-run --dev consensus_dev.jsonl [--groups 5] [--n 4]

Both go through TransformersGenerator.generate() (the pipeline's path: prompts, sampling, cleaning),
with the same request seeds and sampling; the output is JSON on stdout (and --out, if given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling.generation.base import GenerationRequest, SamplingParams  # noqa: E402
from modeling.generation.models import DEFAULT_MODEL_ALIAS  # noqa: E402
from modeling.generation.transformers_backend import TransformersGenerator  # noqa: E402
from modeling.training.sft import load_groups  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--dev", required=True)
    parser.add_argument("--groups", type=int, default=5)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cache-dir", type=Path, default=Path("var/models/hf-cache"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    groups = load_groups([args.dev])[: args.groups]
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    report: dict = {"adapter": args.adapter, "n": args.n, "sampling": vars(sampling), "groups": []}
    generators = {
        "base": TransformersGenerator(DEFAULT_MODEL_ALIAS, device="cpu", cache_dir=args.cache_dir),
        "tuned": TransformersGenerator(DEFAULT_MODEL_ALIAS, device="cpu", cache_dir=args.cache_dir, adapter=args.adapter),
    }
    report["models"] = {name: generator.model_id for name, generator in generators.items()}
    for index, group in enumerate(groups):
        entry: dict = {"group_id": group.group_id, "question": group.question, "reference": group.statement}
        for name, generator in generators.items():
            started = time.perf_counter()
            request = GenerationRequest(group.question, group.opinions, n=args.n, seed=args.seed + index, sampling=sampling)
            entry[name] = [candidate.text for candidate in generator.generate(request)]
            entry[f"{name}_seconds"] = round(time.perf_counter() - started, 1)
        report["groups"].append(entry)
        print(f"{group.group_id} done", file=sys.stderr, flush=True)
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
