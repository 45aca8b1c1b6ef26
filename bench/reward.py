"""Reward-model benchmark: scoring latency of one mediation step, and training throughput, on CPU.

    .venv/bin/python bench/reward.py [--repeats 7] [--threads N] [--version-path DIR] [--skip-training]
        [--only stance_head,stance_head_seed_texts]   # time only these; other entries of the JSON are kept

Measures, in one process, on the CPU:

* scoring: one mediation step's batch, 16 candidates x 5 participants = 80
  (question, opinion, statement) queries, through `predict` exactly as
  modeling/pipeline.py calls it. Each model is warmed up with one call, then timed
  `--repeats` times; the median is reported (goal: < 0.3 s). Models: the
  shipped stance head (the default, modeling/reward/stance_head.py), also on a
  batch of 5 team-written seed opinions x 16 seed statements (real lengths: the
  statements are 40-120 words), the similarity baseline (plain and question-aware) and the cross-encoder at full
  depth (6 layers) and at 2 layers (the depth the done-criterion test trains).
  Scoring cost does not depend on the weights' values, so without --version-path
  the cross-encoder is a fresh one on top of MiniLM; with it, the trained model
  in DIR is timed as well.
* training: rows/s of train_cross_encoder over one epoch of synthetic ratings
  (batch 16, max_length 128, no validation), at 6 and 2 layers.

The texts come from the Habermas Machine question bank (/work/shared/data/hm_questions.json)
via the synthetic stance generator, so lengths are realistic. The machine's load
average is recorded next to the figures: on a shared machine other processes'
load slows every number here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from modeling.reward.base import AgreementQuery, RewardModel  # noqa: E402
from modeling.reward.cross_encoder import CrossEncoderRewardModel  # noqa: E402
from modeling.reward.registry import get_reward_model  # noqa: E402
from modeling.reward.training import TrainingConfig, make_synthetic_stance_rows, train_cross_encoder  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "reward.json"
SEED_RATINGS = ROOT / "modeling" / "data" / "consensus_seed_ratings.jsonl"
QUESTIONS = ROOT.parent / "shared" / "data" / "hm_questions.json"
PARTICIPANTS = 5
CANDIDATES = 16
GOAL_SECONDS = 0.3


def mediation_batch(questions: list[dict]) -> list[AgreementQuery]:
    """80 queries shaped like one mediation step: 5 opinions x 16 candidate statements on one question."""
    rows = make_synthetic_stance_rows(
        questions, n_groups=4, participants_per_group=PARTICIPANTS, statements_per_group=CANDIDATES // 4, seed=11
    )
    question = rows[0].question
    opinions = list(dict.fromkeys(r.opinion for r in rows if r.question == question))[:PARTICIPANTS]
    # Candidates: statements from four groups, so 16 distinct texts of realistic length.
    statements = list(dict.fromkeys(r.statement for r in rows))[:CANDIDATES]
    assert len(opinions) == PARTICIPANTS and len(statements) == CANDIDATES
    return [AgreementQuery(question, opinion, statement) for opinion in opinions for statement in statements]


def seed_text_batch() -> list[AgreementQuery]:
    """80 queries from the team-written seed ratings: 5 opinions on one question x 16 seed statements."""
    rows = [json.loads(line) for line in SEED_RATINGS.read_text(encoding="utf-8").splitlines() if line.strip()]
    question = rows[0]["question"]
    opinions = list(dict.fromkeys(r["opinion"] for r in rows))[:PARTICIPANTS]
    statements = list(dict.fromkeys(r["statement"] for r in rows))[:CANDIDATES]
    return [AgreementQuery(question, opinion, statement) for opinion in opinions for statement in statements]


def time_scoring(model: RewardModel, queries: list[AgreementQuery], repeats: int) -> dict[str, Any]:
    """Median wall and CPU seconds of one predict() over `queries`, after a warm-up call.

    CPU time (this process, all threads) is reported next to wall time because on a
    shared machine wall time mostly measures the other processes: with one
    intra-op thread, CPU time approximates the wall time an idle machine would give.
    """
    model.predict(queries)  # warm-up: first-call allocations, lazy init
    wall, cpu = [], []
    for _ in range(repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        scores = model.predict(queries)
        cpu.append(time.process_time() - cpu_start)
        wall.append(time.perf_counter() - wall_start)
    assert len(scores) == len(queries)
    median = statistics.median(wall)
    return {
        "queries": len(queries),
        "median_s": round(median, 4),
        "min_s": round(min(wall), 4),
        "max_s": round(max(wall), 4),
        "median_cpu_s": round(statistics.median(cpu), 4),
        "repeats": repeats,
        "meets_goal": median < GOAL_SECONDS,
        "version": model.version,
    }


def time_training(questions: list[dict], encoder_layers: int | None) -> dict[str, Any]:
    rows = make_synthetic_stance_rows(questions, n_groups=8, seed=5)
    config = TrainingConfig(
        epochs=1,
        batch_size=16,
        max_length=128,
        validation_fraction=0.0,
        evaluate_baselines=False,
        encoder_layers=encoder_layers,
        device="cpu",
    )
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    result = train_cross_encoder(rows, config)
    cpu_s = time.process_time() - cpu_start
    return {
        "rows": len(rows),
        "rows_per_second": round(result.metrics["train_rows_per_second"], 2),
        # Includes loading MiniLM (~1-2 s) and the end-of-run bookkeeping.
        "wall_s_including_load": round(time.perf_counter() - wall_start, 2),
        "cpu_s_including_load": round(cpu_s, 2),
        "batch_size": config.batch_size,
        "max_length": config.max_length,
        "encoder_layers": encoder_layers or 6,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--output", default=str(RESULTS), help="Where to write the JSON results.")
    parser.add_argument("--version-path", help="Also time a trained cross-encoder saved in this directory.")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--only", help="Comma-separated scoring entries to time; the output file's other entries are kept.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    questions = json.loads(QUESTIONS.read_text(encoding="utf-8"))
    queries = mediation_batch(questions)
    load_before = os.getloadavg()

    batches = {"stance_head_seed_texts": seed_text_batch()}
    models: dict[str, Callable[[], RewardModel]] = {
        "stance_head": lambda: get_reward_model("stance-head", device="cpu"),
        "stance_head_seed_texts": lambda: get_reward_model("stance-head", device="cpu"),
        "similarity": lambda: get_reward_model("similarity", device="cpu"),
        "similarity_question_aware": lambda: get_reward_model("similarity", device="cpu", question_aware=True),
        "cross_encoder_6_layers": lambda: CrossEncoderRewardModel.from_base(device="cpu"),
        "cross_encoder_2_layers": lambda: CrossEncoderRewardModel.from_base(device="cpu", encoder_layers=2),
    }
    if args.version_path:
        models["cross_encoder_trained"] = lambda: CrossEncoderRewardModel.load(args.version_path, device="cpu")

    only = set(args.only.split(",")) if args.only else None
    previous: dict[str, Any] = {}
    if only is not None:
        unknown = only - set(models)
        if unknown:
            parser.error(f"unknown --only entries: {', '.join(sorted(unknown))}")
        models = {name: build for name, build in models.items() if name in only}
        if Path(args.output).is_file():
            previous = json.loads(Path(args.output).read_text(encoding="utf-8"))
        args.skip_training = True

    scoring: dict[str, Any] = dict(previous.get("scoring", {}))
    for name, build in models.items():
        started = time.perf_counter()
        model = build()
        load_s = time.perf_counter() - started
        batch = batches.get(name, queries)
        scoring[name] = {
            **time_scoring(model, batch, args.repeats),
            "load_s": round(load_s, 2),
            "texts": "seed" if name in batches else "synthetic",
            "torch_threads": torch.get_num_threads(),
            "load_average_before": [round(x, 2) for x in os.getloadavg()],
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        print(
            f"{name}: median {scoring[name]['median_s']:.3f} s wall, {scoring[name]['median_cpu_s']:.3f} s CPU for {len(batch)} queries",
            flush=True,
        )

    training: dict[str, Any] = dict(previous.get("training", {}))
    if not args.skip_training:
        for layers in (None, 2):
            key = f"cross_encoder_{layers or 6}_layers"
            training[key] = time_training(questions, layers)
            print(f"training {key}: {training[key]['rows_per_second']} rows/s", flush=True)

    machine = {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    if only is not None and "machine" in previous:
        # The machine block describes the full run; a partial run records its own per entry.
        machine = previous["machine"]
    report = {
        "scoring": scoring,
        "training": training,
        "goal_s": GOAL_SECONDS,
        "shape": {"participants": PARTICIPANTS, "candidates": CANDIDATES},
        "machine": machine,
        "recorded_at": previous.get("recorded_at") if only is not None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
