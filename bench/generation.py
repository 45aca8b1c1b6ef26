"""Generation benchmark: 16 candidates for 5 opinions with the default model, on this machine.

    .venv/bin/python bench/generation.py [--n 16] [--max-new-tokens 96] [--threads N] [--skip-cold-load]

Measures, in one process:

* model load: sha256 verification, cold load (GGUF de-quantisation + tokenizer
  conversion + writing the safetensors cache) and cached load;
* (a) sequential sampling, one generate() per candidate, against (b) the batched path,
  all 16 rows in one generate() with the common prompt prefix prefilled once, on the
  same 16 prompts with the same token budget (plus (b) without the shared prefix).
  The ratio of wall times is `batched_speedup`. Sampled lengths differ between the two
  (different random draws), so tokens/s is reported for both as well;
* one full `generate()` round as the pipeline calls it (cleaning, resampling included);
* the split between prefill and decoding for the batch, and peak memory.

The two paths run interleaved (b, a, b, a, b) and the fastest run of each is compared:
on a shared machine interference only adds time, so the minimum is the cleanest estimate.
CPU seconds of the process are reported beside wall time for the same reason. Results go to bench/results/generation.json
(other top-level keys there, e.g. "vllm_cpu" from bench/vllm_cpu.sh, are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# As in production (transformers_backend sets it too, but only before torch is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from modeling.generation.base import GenerationRequest, SamplingParams  # noqa: E402
from modeling.generation.models import (  # noqa: E402
    DEFAULT_MODEL_ALIAS,
    default_cache_dir,
    load_model,
    resolve_model,
)
from modeling.generation.prompts import plan_prompts  # noqa: E402
from modeling.generation.transformers_backend import Completion, TransformersGenerator  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "generation.json"
QUESTION = "How should our city reduce traffic congestion in the centre?"
OPINIONS = [
    "We should expand public transport, because cars pollute the city and the traffic is awful at rush hour.",
    "Cars are necessary for families in the suburbs; public transport simply does not reach us.",
    "Bike lanes are the cheapest fix, and they make people healthier at the same time.",
    "Any plan must be affordable; local taxes are already too high for most households.",
    "Let's pilot changes in one district first and measure the results before committing the whole city.",
]


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS); the process-wide peak so far.
    scale = 1024 * 1024 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def summarise(completions: list[Completion], wall_s: float, cpu_s: float) -> dict[str, Any]:
    tokens = sum(completion.completion_tokens for completion in completions)
    return {
        "wall_s": round(wall_s, 3),
        # CPU seconds of this process (all threads): the work done, much less sensitive than
        # wall time to other processes competing for the same cores.
        "cpu_s": round(cpu_s, 3),
        "completion_tokens": tokens,
        "prompt_tokens": sum(completion.prompt_tokens for completion in completions),
        "tokens_per_s": round(tokens / wall_s, 2),
        "rows_hit_token_limit": sum(completion.hit_token_limit for completion in completions),
    }


def timed_sampling(
    generator: TransformersGenerator, prompts: list[str], sampling: SamplingParams, seed: int, batched: bool
) -> dict[str, Any]:
    started, cpu_started = time.perf_counter(), time.process_time()
    completions = generator.sample_prompts(prompts, sampling=sampling, seed=seed, batched=batched)
    return summarise(completions, time.perf_counter() - started, time.process_time() - cpu_started)


def prefill_seconds(generator: TransformersGenerator, prompts: list[str]) -> float:
    """One forward pass over the padded batch, logits for the last position only (as generate does)."""
    encoded = generator.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        started = time.perf_counter()
        generator.model(**encoded, logits_to_keep=1)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96, help="CONCORD_MAX_NEW_TOKENS's default")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--repeats", type=int, default=2, help="sequential runs (batched runs: one more)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: usable CPUs)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default ~/.cache/concord)")
    parser.add_argument("--skip-cold-load", action="store_true", help="skip the ~20 s cold GGUF conversion")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    load_before = os.getloadavg()
    results: dict[str, Any] = {
        "command": "python bench/generation.py " + " ".join(sys.argv[1:]),
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "usable_cpus": len(os.sched_getaffinity(0)),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "config": {
            "model": DEFAULT_MODEL_ALIAS,
            "n": args.n,
            "opinions": len(OPINIONS),
            "max_new_tokens": args.max_new_tokens,
            "temperature": 0.9,
            "top_p": 0.95,
            "seed": args.seed,
        },
    }

    # --- model load -------------------------------------------------------------
    load: dict[str, Any] = {}
    started = time.perf_counter()
    source = resolve_model(DEFAULT_MODEL_ALIAS)
    load["sha256_verify_s"] = round(time.perf_counter() - started, 3)
    if not args.skip_cold_load:
        with tempfile.TemporaryDirectory(prefix="concord-cold-") as cold_cache:
            cold = load_model(DEFAULT_MODEL_ALIAS, device="cpu", cache_dir=Path(cold_cache))
            load["cold_gguf_s"] = round(cold.load_seconds, 2)
            # Loading the fresh copy again: what every later process pays.
            warm = load_model(DEFAULT_MODEL_ALIAS, device="cpu", cache_dir=Path(cold_cache))
            load["cached_s"] = round(warm.load_seconds, 2)
            del cold, warm
    generator = TransformersGenerator(
        DEFAULT_MODEL_ALIAS, device="cpu", cache_dir=args.cache_dir or default_cache_dir(), num_threads=args.threads
    )
    load["generator_init_s"] = round(generator.load_seconds, 2)
    load["generator_from_cache"] = generator.loaded_from_cache
    load["peak_rss_mb_after_load"] = round(peak_rss_mb(), 1)
    results["load"] = load
    results["model_revision"] = source.revision
    results["machine"]["torch_threads"] = torch.get_num_threads()
    print(f"load: {load}", flush=True)

    sampling = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=args.max_new_tokens)
    plans = plan_prompts(QUESTION, OPINIONS, args.seed, range(args.n))
    prompts = [generator.render_chat(plan.messages) for plan in plans]

    # --- warm-up: first calls pay for lazy initialisation in torch ------------------
    generator.sample_prompts(prompts[:2], sampling=SamplingParams(max_new_tokens=8), seed=0)

    # --- (a) sequential vs (b) batched -------------------------------------------
    # Interleaved, batched first and last, and the fastest run of each counted: on a shared
    # machine, interference only ever adds time, so the minimum is the cleanest estimate.
    batched_runs: list[dict[str, Any]] = []
    sequential_runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        batched_runs.append(timed_sampling(generator, prompts, sampling, args.seed + repeat, batched=True))
        print(f"batched: {batched_runs[-1]}", flush=True)
        sequential_runs.append(timed_sampling(generator, prompts, sampling, args.seed + repeat, batched=False))
        print(f"sequential: {sequential_runs[-1]}", flush=True)
    batched_runs.append(timed_sampling(generator, prompts, sampling, args.seed + args.repeats, batched=True))
    print(f"batched: {batched_runs[-1]}", flush=True)

    def best(runs: list[dict[str, Any]]) -> dict[str, Any]:
        fastest = min(runs, key=lambda run: run["wall_s"])
        return {**fastest, "min_cpu_s": min(run["cpu_s"] for run in runs), "runs": runs}

    results["sequential"] = best(sequential_runs)
    results["batched"] = {**best(batched_runs), "shared_prefix": generator.share_prompt_prefix}
    results["batched_speedup"] = round(results["sequential"]["wall_s"] / results["batched"]["wall_s"], 2)
    results["batched_speedup_cpu_time"] = round(results["sequential"]["min_cpu_s"] / results["batched"]["min_cpu_s"], 2)
    results["tokens_per_s_speedup"] = round(
        results["batched"]["tokens_per_s"] / results["sequential"]["tokens_per_s"], 2
    )

    # Ablation: the batch without the shared-prefix prefill.
    generator.share_prompt_prefix = False
    results["batched_without_shared_prefix"] = timed_sampling(generator, prompts, sampling, args.seed, batched=True)
    generator.share_prompt_prefix = True
    print(f"batched, no shared prefix: {results['batched_without_shared_prefix']}", flush=True)

    # Where the batched time goes: prefill of all rows vs decoding steps.
    prefill_batch = prefill_seconds(generator, prompts)
    prefill_single = prefill_seconds(generator, prompts[:1])
    results["batched"]["prefill_all_rows_unshared_s"] = round(prefill_batch, 3)
    results["sequential"]["prefill_one_row_s"] = round(prefill_single, 3)
    token_ids = [generator.tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    shared = 0
    while all(len(ids) > shared + 1 and ids[shared] == token_ids[0][shared] for ids in token_ids):
        shared += 1
    results["batched"]["shared_prefix_tokens"] = shared
    results["batched"]["prompt_tokens_per_row"] = len(token_ids[0])

    # --- a full round as the pipeline calls it -------------------------------------
    sampler_calls: list[int] = []
    original = generator.sample_prompts

    def counting(prompts_: Any, **kwargs: Any) -> list[Completion]:
        sampler_calls.append(len(prompts_))
        return original(prompts_, **kwargs)

    generator.sample_prompts = counting  # type: ignore[method-assign]
    request = GenerationRequest(question=QUESTION, opinions=OPINIONS, n=args.n, seed=args.seed, sampling=sampling)
    started = time.perf_counter()
    candidates = generator.generate(request)
    round_s = time.perf_counter() - started
    generator.sample_prompts = original  # type: ignore[method-assign]
    results["generate_round"] = {
        "wall_s": round(round_s, 3),
        "candidates": len(candidates),
        "distinct_texts": len({candidate.text for candidate in candidates}),
        # Rows per generate() call: more than one entry means empty/duplicate samples were resampled.
        "generate_calls_rows": sampler_calls,
        "example": candidates[0].text,
    }
    results["peak_rss_mb"] = round(peak_rss_mb(), 1)
    results["machine"]["loadavg_before"] = [round(value, 2) for value in load_before]
    results["machine"]["loadavg_after"] = [round(value, 2) for value in os.getloadavg()]

    previous: dict[str, Any] = {}
    if args.output.exists():
        try:
            previous = json.loads(args.output.read_text())
        except ValueError:
            previous = {}
    # Keep sections other scripts own (vllm_cpu), replace ours.
    merged = {key: value for key, value in previous.items() if key == "vllm_cpu"}
    merged.update(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(merged, indent=2, ensure_ascii=False) + "\n")
    summary_keys = ("batched_speedup", "batched_speedup_cpu_time", "tokens_per_s_speedup", "generate_round")
    print(json.dumps({key: results[key] for key in summary_keys}, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
