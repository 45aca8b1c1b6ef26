"""The flywheel, measured offline: does a version trained on what one cohort rated mediate the next better?

    .venv/bin/python bench/flywheel.py                       # the default, small scale (about 15-25 min on 2 CPU cores)
    .venv/bin/python bench/flywheel.py --collect-groups 4 --eval-groups 6 --sft-steps 8 --dpo-steps 8

1. A simulated cohort (simulation/bots.py through `simulate_cohort`: persona opinions written by the
   generator, agreement and quality rated by the bots' word-overlap rule) deliberates on questions of
   the `train` split with the site's current default generator (the shipped SFT adapter).
2. From what it rated: the SFT rows (build_sft_dataset's filters: mean quality >= 5) and the preference
   pairs (rankings), through the same selectors the product uses (research.training_data).
3. SFT continues the default adapter on those rows; DPO continues the SFT version on the pairs
   (research.generator_training, as `train_generator` and the training page do).
4. A second cohort on held-out `iid_test` questions, two arms drawn by the experiment's balanced
   assignment: `old` (the default) and `new` (the DPO version).
5. Per group: the usable rate of all candidates (modeling.generation.quality.assess), the predicted
   welfare of the winning statement (the reward model's utilitarian welfare), and the simulated raters'
   mean agreement with the statements shown. Means per arm with 95% bootstrap intervals over groups,
   and the difference new - old.

The simulated raters are a word-overlap rule, not people: a change here says the new version writes
more of what that rule rewards, not that groups would endorse it more. Results go to
bench/results/flywheel.json and the flywheel section of docs/benchmarks.md.

Everything runs in its own SQLite database (var/bench-flywheel/), started fresh; converted models are
cached in var/models as usual.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path
from statistics import fmean
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS_PATH = ROOT / "bench" / "results" / "flywheel.json"
DOCS_PATH = ROOT / "docs" / "benchmarks.md"
DOCS_BEGIN, DOCS_END = "<!-- flywheel:begin -->", "<!-- flywheel:end -->"
BENCH_DIR = ROOT / "var" / "bench-flywheel"
HM_BANK = ROOT.parent / "shared" / "data" / "hm_questions.json"


def _setup_django() -> None:
    # Our own database, fresh; the site's model store (converted weights are reused between runs).
    shutil.rmtree(BENCH_DIR, ignore_errors=True)
    BENCH_DIR.mkdir(parents=True)
    os.environ["CONCORD_VAR_DIR"] = str(BENCH_DIR)
    os.environ.setdefault("CONCORD_MODEL_STORE", str(ROOT / "var" / "models"))
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)  # embedded: mediation runs in the local site's own process
    os.environ.setdefault("DEBUG", "1")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()


def bootstrap(values: list[float], *, resamples: int, rng: random.Random) -> tuple[float, float]:
    """95% percentile interval of the mean."""
    if len(values) < 2:
        return (float("nan"), float("nan"))
    means = sorted(fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def bootstrap_difference(new: list[float], old: list[float], *, resamples: int, rng: random.Random) -> tuple[float, float]:
    if len(new) < 2 or len(old) < 2:
        return (float("nan"), float("nan"))
    diffs = sorted(fmean(rng.choices(new, k=len(new))) - fmean(rng.choices(old, k=len(old))) for _ in range(resamples))
    return diffs[int(0.025 * resamples)], diffs[int(0.975 * resamples) - 1]


def _cohort(call_command: Any, slug: str, groups: int, seed: int) -> dict[str, Any]:
    out = StringIO()
    call_command("simulate_cohort", "--experiment", slug, "--groups", str(groups), "--seed", str(seed), "--timeout", "1800", stdout=out)
    return json.loads(out.getvalue())


def _group_figures(experiment: Any) -> dict[str, list[dict[str, float]]]:
    """Per arm, one record per completed group: usable rate, winner's predicted welfare, simulated agreement."""
    from deliberation.models import Candidate, Opinion, Rating, Round
    from modeling.generation.quality import assess

    figures: dict[str, list[dict[str, float]]] = {}
    rounds = Round.objects.filter(room__experiment=experiment, outcome=Round.Outcome.COMPLETED).select_related("room__arm", "room__question")
    for round_ in rounds:
        opinions = list(Opinion.objects.filter(round=round_).order_by("participant_id").values_list("text", flat=True))
        candidates = list(Candidate.objects.filter(round=round_))
        if not candidates:
            continue
        usable = [assess(c.text, question=round_.room.question.text, opinions=opinions).usable for c in candidates]
        winner = min((c for c in candidates if c.rank is not None), key=lambda c: c.rank, default=None)
        agreement = list(Rating.objects.filter(candidate__round=round_).values_list("agreement", flat=True))
        figures.setdefault(round_.room.arm.name, []).append(
            {
                "usable_rate": sum(usable) / len(usable),
                "predicted_welfare": float(winner.welfare) if winner is not None and winner.welfare is not None else float("nan"),
                "simulated_agreement": fmean(agreement) if agreement else float("nan"),
            }
        )
    return figures


def _summarise(figures: dict[str, list[dict[str, float]]], *, resamples: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    metrics = ("usable_rate", "predicted_welfare", "simulated_agreement")
    arms: dict[str, Any] = {}
    for arm, groups in figures.items():
        arms[arm] = {"groups": len(groups)}
        for metric in metrics:
            values = [g[metric] for g in groups if g[metric] == g[metric]]
            low, high = bootstrap(values, resamples=resamples, rng=rng)
            arms[arm][metric] = {"mean": round(fmean(values), 4) if values else None, "ci95": [round(low, 4), round(high, 4)]}
    difference: dict[str, Any] = {}
    if "new" in figures and "old" in figures:
        for metric in metrics:
            new = [g[metric] for g in figures["new"] if g[metric] == g[metric]]
            old = [g[metric] for g in figures["old"] if g[metric] == g[metric]]
            if new and old:
                low, high = bootstrap_difference(new, old, resamples=resamples, rng=rng)
                difference[metric] = {"new_minus_old": round(fmean(new) - fmean(old), 4), "ci95": [round(low, 4), round(high, 4)]}
    return {"arms": arms, "difference": difference}


def run(args: argparse.Namespace) -> dict[str, Any]:
    _setup_django()
    from django.core.management import call_command

    from deliberation.mediator import default_generator_version
    from deliberation.models import Arm, Experiment
    from modeling.training.study_data import write_jsonl
    from research.generator_training import GeneratorTrainingSpec, generator_train
    from research.training_data import preference_dataset, sft_dataset

    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        print(f"[flywheel] {name}: {timings[name]} s", file=sys.stderr, flush=True)
        return now

    call_command("migrate", verbosity=0)
    for split in ("train", "iid_test"):
        call_command("import_questions", str(HM_BANK), "--split", split, stdout=StringIO())
    default = default_generator_version()
    if default is None:
        raise SystemExit("The site has no default generator version (CONCORD_GENERATOR_ADAPTER); nothing to improve on.")

    def experiment(slug: str, split: str, arms: dict[str, Any]) -> Experiment:
        exp = Experiment.objects.create(
            slug=slug, name=slug, group_size=3, min_group_size=3, question_split=split, opinion_seconds=1800,
            rating_seconds=1800, assignment_seed=args.seed,
        )
        for name, version in arms.items():
            Arm.objects.create(experiment=exp, name=name, generator_version=version, n_candidates=args.n_candidates, k_shown=args.n_candidates)
        return exp

    # 1. Collect: the current default on train questions.
    collect = experiment("flywheel-collect", "train", {"current": None})
    lap_at = time.perf_counter()
    collected = _cohort(call_command, collect.slug, args.collect_groups, args.seed)
    lap_at = lap("collect_cohort", lap_at)

    # 2. Datasets, through the product's selectors.
    sft_build = sft_dataset(experiments=[collect], min_quality=args.min_quality)
    pref_build = preference_dataset(experiments=[collect])
    data_dir = BENCH_DIR / "data"
    write_jsonl(sft_build.rows, data_dir / "sft.jsonl")
    write_jsonl(pref_build.rows, data_dir / "preferences.jsonl")
    print(sft_build.report(), pref_build.report(), sep="\n", file=sys.stderr)

    # 3. SFT continuing the default, then DPO continuing the SFT version.
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = {"batch_size": args.batch_size, "seed": args.seed, "epochs": 1, "shuffles": 1}
    sft = generator_train(spec=GeneratorTrainingSpec(
        method="sft", data=data_dir / "sft.jsonl", parent=default, name=f"flywheel-sft-{stamp}", max_steps=args.sft_steps,
        learning_rate=args.sft_learning_rate, out=BENCH_DIR / "adapters" / "sft", **common,
    ))
    lap_at = lap("sft", lap_at)
    dpo = generator_train(spec=GeneratorTrainingSpec(
        method="dpo", data=data_dir / "preferences.jsonl", parent=sft.version, name=f"flywheel-dpo-{stamp}",
        max_steps=args.dpo_steps, learning_rate=args.dpo_learning_rate, beta=args.beta, out=BENCH_DIR / "adapters" / "dpo", **common,
    ))
    lap_at = lap("dpo", lap_at)

    # 4. Held-out cohort: old vs new, balanced assignment.
    held_out = experiment("flywheel-heldout", "iid_test", {"old": None, "new": dpo.version})
    evaluated = _cohort(call_command, held_out.slug, args.eval_groups, args.seed + 1)
    lap("heldout_cohort", lap_at)

    summary = _summarise(_group_figures(held_out), resamples=args.resamples, seed=args.seed)
    return {
        "benchmark": "flywheel",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "command": "bench/flywheel.py " + " ".join(sys.argv[1:]),
        "settings": {key: value for key, value in vars(args).items() if key != "no_docs"},
        "default_version": default.name,
        "collect": {
            "groups": args.collect_groups,
            "completed": collected.get("groups_completed"),
            "sft_rows": len(sft_build.rows),
            "sft_filters": [vars(step) for step in sft_build.steps],
            "preference_pairs": len(pref_build.rows),
            "preference_filters": [vars(step) for step in pref_build.steps],
        },
        "versions": {
            name: {
                "name": trained.version.name, "parent": trained.version.parent.name if trained.version.parent else None,
                "dataset_sha256": trained.version.dataset_sha256, "adapter_sha256": trained.version.sha256,
                "metrics": trained.version.metrics,
            }
            for name, trained in (("sft", sft), ("dpo", dpo))
        },
        "heldout": {"groups": args.eval_groups, "completed": evaluated.get("groups_completed"), **summary},
        "seconds": {**timings, "total": round(time.perf_counter() - started, 1)},
        "note": "Simulated raters (simulation/bots.py: word overlap with the rater's side plus noise) are not people.",
    }


def _fmt(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("mean") is None:
        return "n/a"
    low, high = cell["ci95"]
    return f"{cell['mean']:.3f} [{low:.3f}, {high:.3f}]"


def docs_section(result: dict[str, Any]) -> str:
    held = result["heldout"]
    arms, diff = held["arms"], held["difference"]
    lines = [
        f"Run {result['date']} on {result['machine']['cpus']} CPU cores: `{result['command']}`; "
        f"{result['seconds']['total']:.0f} s in all.",
        "",
        f"Collected: {result['collect']['completed']}/{result['collect']['groups']} groups on `train` questions with "
        f"`{result['default_version']}` gave {result['collect']['sft_rows']} SFT rows (mean quality >= "
        f"{result['settings']['min_quality']:g}) and {result['collect']['preference_pairs']} preference pairs. "
        f"SFT: {result['versions']['sft']['metrics']['steps']} steps from the default; DPO: "
        f"{result['versions']['dpo']['metrics']['steps']} steps from the SFT version.",
        "",
        f"Held-out cohort: {held['completed']}/{held['groups']} groups on `iid_test` questions. Means over groups, 95% bootstrap intervals:",
        "",
        "| | old (default) | new (SFT+DPO) | new - old |",
        "|---|---|---|---|",
    ]
    for metric, label in (("usable_rate", "usable rate of candidates"), ("predicted_welfare", "predicted welfare of the winner"),
                          ("simulated_agreement", "simulated agreement (shown statements)")):
        d = diff.get(metric)
        delta = f"{d['new_minus_old']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d else "n/a"
        lines.append(f"| {label} | {_fmt(arms.get('old', {}).get(metric))} | {_fmt(arms.get('new', {}).get(metric))} | {delta} |")
    lines += ["", f"Groups per arm: old {arms.get('old', {}).get('groups', 0)}, new {arms.get('new', {}).get('groups', 0)}. "
              "Simulated raters are a word-overlap rule, not people."]
    return "\n".join(lines)


def write_docs(result: dict[str, Any]) -> None:
    text = DOCS_PATH.read_text(encoding="utf-8")
    if DOCS_BEGIN not in text:
        return
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    DOCS_PATH.write_text(f"{head}{DOCS_BEGIN}\n{docs_section(result)}\n{DOCS_END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collect-groups", type=int, default=4)
    parser.add_argument("--eval-groups", type=int, default=6, help="Held-out groups, split between the two arms.")
    parser.add_argument("--n-candidates", type=int, default=4, help="Candidates per round (all shown and rated).")
    parser.add_argument("--min-quality", type=float, default=5.0)
    parser.add_argument("--sft-steps", type=int, default=8)
    parser.add_argument("--dpo-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--sft-learning-rate", type=float, default=1e-4)
    parser.add_argument("--dpo-learning-rate", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--resamples", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-docs", action="store_true", help="Do not update docs/benchmarks.md.")
    args = parser.parse_args(argv)
    result = run(args)
    RESULTS_PATH.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    if not args.no_docs:
        write_docs(result)
    print(json.dumps(result["heldout"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
