"""Train the cross-encoder reward model on observed agreement ratings (framework-free).

A row is one rating: {group_id, participant_id, question, opinion, statement,
agreement 1..7}, where `opinion` is the rater's own opinion on `question` and
`statement` the candidate they rated.

- Split by group, seeded: no group has rows on both sides, so validation measures
  generalisation to new groups (and new statements), not memorised ones.
- Loss: MSE on the 1-7 scale, plus optionally `pairwise_weight` x a Bradley-Terry
  loss -log sigmoid(z_i - z_j) over pairs of statements the same participant rated
  differently (i rated higher). Batches are packed participant by participant so
  those pairs share a batch. The pairwise term trains the order directly, which is
  all that welfare ranking uses.
- Early stopping on validation MSE (patience in epochs); the best epoch's weights
  are kept.
- CPU-friendly defaults: batch 16, max_length 128, few epochs. The head starts as
  a calibrated similarity model (cosine term on, linear weights at zero, bias at
  the training mean), so training starts from a sensible baseline rather than
  from noise, and the encoder gets a useful gradient from the first step.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .base import LIKERT_MAX, LIKERT_MIN, AgreementQuery
from .cross_encoder import CrossEncoderRewardModel, likert_from_logit, logit_from_likert
from .metrics import RatedQuery, compare_with_baselines, similarity_baselines

ROW_FIELDS = ("group_id", "participant_id", "question", "opinion", "statement", "agreement")


class DatasetError(ValueError):
    """A training or evaluation row is malformed; the message names the row or line."""


@dataclass(frozen=True)
class TrainingRow:
    group_id: str
    participant_id: str
    question: str
    opinion: str
    statement: str
    agreement: float

    @property
    def participant_key(self) -> tuple[str, str]:
        # Participant ids are only unique within a group.
        return (self.group_id, self.participant_id)

    @property
    def query(self) -> AgreementQuery:
        return AgreementQuery(question=self.question, opinion=self.opinion, statement=self.statement)

    def rated(self) -> RatedQuery:
        return RatedQuery(participant=self.participant_key, query=self.query, agreement=self.agreement)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def row_from_mapping(raw: Any, where: str) -> TrainingRow:
    """Validate one row; `where` (e.g. "line 7") prefixes every error message."""
    if not isinstance(raw, Mapping):
        raise DatasetError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    missing = [name for name in ROW_FIELDS if name not in raw]
    if missing:
        raise DatasetError(f"{where}: missing field(s) {', '.join(missing)}")
    ids: dict[str, str] = {}
    for name in ("group_id", "participant_id"):
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            raise DatasetError(f"{where}: {name} must be a non-empty string or an integer, got {value!r}")
        ids[name] = str(value)
    texts: dict[str, str] = {}
    for name in ("question", "opinion", "statement"):
        value = raw[name]
        if not isinstance(value, str):
            raise DatasetError(f"{where}: {name} must be a string, got {type(value).__name__}")
        if name != "question" and not value.strip():
            raise DatasetError(f"{where}: {name} is empty")
        texts[name] = value
    agreement = raw["agreement"]
    if isinstance(agreement, bool) or not isinstance(agreement, numbers.Real) or not math.isfinite(float(agreement)):
        raise DatasetError(f"{where}: agreement must be a number, got {agreement!r}")
    if not LIKERT_MIN <= float(agreement) <= LIKERT_MAX:
        raise DatasetError(f"{where}: agreement {agreement} is outside the 1-7 scale")
    return TrainingRow(agreement=float(agreement), **ids, **texts)


def rows_from_mappings(raws: Iterable[Any], source: str = "row") -> list[TrainingRow]:
    return [row_from_mapping(raw, f"{source} {index}") for index, raw in enumerate(raws)]


def read_jsonl_records(path: str | Path) -> list[tuple[int, Any]]:
    """(1-based line number, parsed JSON) for every non-blank line; errors name the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} is not UTF-8 text: {error}") from error
    records: list[tuple[int, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path} line {number}: invalid JSON ({error.msg} at column {error.colno})") from error
    if not records:
        raise DatasetError(f"{path} holds no rows")
    return records


def load_jsonl(path: str | Path) -> list[TrainingRow]:
    """Validated rows from a JSONL file (blank lines skipped); errors name the 1-based line number."""
    return [row_from_mapping(raw, f"{path} line {number}") for number, raw in read_jsonl_records(path)]


def dataset_sha256(rows: Sequence[TrainingRow]) -> str:
    """sha256 of the canonicalised rows: independent of row order, key order and id types."""
    canonical = sorted(
        json.dumps(row.as_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False) for row in rows
    )
    return hashlib.sha256("\n".join(canonical).encode("utf-8")).hexdigest()


def split_by_group(
    rows: Sequence[TrainingRow], validation_fraction: float, seed: int
) -> tuple[list[TrainingRow], list[TrainingRow]]:
    """Seeded split with every group wholly on one side."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    groups = sorted({row.group_id for row in rows})
    if validation_fraction == 0.0:
        return list(rows), []
    if len(groups) < 2:
        raise DatasetError(f"need at least 2 groups to hold some out for validation, got {len(groups)}")
    random.Random(seed).shuffle(groups)
    n_validation = min(len(groups) - 1, max(1, round(validation_fraction * len(groups))))
    held_out = set(groups[:n_validation])
    train = [row for row in rows if row.group_id not in held_out]
    validation = [row for row in rows if row.group_id in held_out]
    return train, validation


@dataclass
class TrainingConfig:
    base_model: str = "all-minilm-l6-v2"
    epochs: int = 3
    batch_size: int = 16
    learning_rate: float = 1e-4  # encoder; 5e-5 learns too slowly for the few hundred steps a CPU run affords
    head_learning_rate: float = 1e-3
    # Initial weight of cos(u, v) in the logit (see CrossEncoderRegressor): large
    # enough that the encoder gets a useful gradient from the first step.
    initial_cosine_scale: float = 4.0
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_length: int = 128
    seed: int = 0
    validation_fraction: float = 0.2
    patience: int = 1  # epochs without validation improvement before stopping
    pairwise_weight: float = 0.0
    # Fine-tune only the top N transformer layers (embeddings and lower layers
    # frozen); None trains everything. Backpropagating through 2 of MiniLM's 6
    # layers is ~2-3x cheaper per step on CPU.
    trainable_layers: int | None = None
    # Keep only the bottom N encoder layers (None: all 6 of MiniLM): a shallower
    # cross-encoder trains and scores proportionally faster.
    encoder_layers: int | None = None
    device: str = "auto"
    evaluate_baselines: bool = True  # also score constant-mean and similarity on validation

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (pairs need two rows)")
        if self.pairwise_weight < 0:
            raise ValueError("pairwise_weight must be >= 0")
        if self.patience < 0:
            raise ValueError("patience must be >= 0")
        if self.trainable_layers is not None and self.trainable_layers < 0:
            raise ValueError("trainable_layers must be >= 0 or None")


@dataclass
class TrainingResult:
    model: CrossEncoderRewardModel
    train_mean: float
    dataset_sha256: str
    metrics: dict[str, Any]
    params: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


EpochCallback = Callable[[dict[str, float]], None]


def participant_batches(rows: Sequence[TrainingRow], batch_size: int, rng: random.Random) -> list[list[TrainingRow]]:
    """Shuffle participants (and rows within each), then pack whole participants into batches.

    Keeping a participant's rows together lets the pairwise loss see their pairs;
    a participant with more rows than batch_size is split across batches.
    """
    blocks: dict[tuple[str, str], list[TrainingRow]] = {}
    for row in rows:
        blocks.setdefault(row.participant_key, []).append(row)
    order = list(blocks.values())
    rng.shuffle(order)
    batches: list[list[TrainingRow]] = []
    current: list[TrainingRow] = []
    for block in order:
        block = block[:]
        rng.shuffle(block)
        if current and len(current) + len(block) > batch_size:
            batches.append(current)
            current = []
        while len(block) > batch_size:
            batches.append(block[:batch_size])
            block = block[batch_size:]
        current.extend(block)
    if current:
        batches.append(current)
    return batches


def bradley_terry_loss(
    logits: torch.Tensor, targets: torch.Tensor, participants: Sequence[tuple[str, str]]
) -> torch.Tensor | None:
    """Mean -log sigmoid(z_i - z_j) over same-participant pairs with target_i > target_j; None if no pair."""
    index = {key: n for n, key in enumerate(dict.fromkeys(participants))}
    owner = torch.tensor([index[key] for key in participants], device=logits.device)
    same = owner[:, None] == owner[None, :]
    better = targets[:, None] > targets[None, :]
    mask = same & better
    if not mask.any():
        return None
    margins = logits[:, None] - logits[None, :]
    return torch.nn.functional.softplus(-margins[mask]).mean()


def _linear_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(1, total_steps - warmup_steps)
        return max(0.0, (total_steps - step) / remaining)

    return factor


def _trainable_encoder_parameters(encoder: torch.nn.Module, trainable_layers: int | None) -> list[torch.nn.Parameter]:
    """Freeze all but the top `trainable_layers` layers; returns the parameters left trainable."""
    if trainable_layers is None:
        return list(encoder.parameters())
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(f"trainable_layers needs a BERT-like encoder with encoder.layer, got {type(encoder).__name__}")
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    trainable: list[torch.nn.Parameter] = []
    for layer in list(layers)[len(layers) - trainable_layers :] if trainable_layers else []:
        for parameter in layer.parameters():
            parameter.requires_grad_(True)
            trainable.append(parameter)
    return trainable


def _initialise_head(
    model: CrossEncoderRewardModel, train_rows: Sequence[TrainingRow], train_mean: float, cosine_scale: float
) -> None:
    """Start as a calibrated similarity model: z = a * (cos(u, v) - mean cos) + logit(train mean).

    The linear weights start at zero, so the initial predictions are the training
    mean shifted by how much more (or less) similar a pair is than average; the
    mean cosine is measured on up to 64 training rows.
    """
    network = model.network
    sample = train_rows[:64]
    was_training = network.training
    network.eval()
    with torch.no_grad():
        batch = model.tokenize([row.query for row in sample]).to(model.device)  # type: ignore[attr-defined]  # a BatchEncoding
        first, second = network.pooled(**batch)
        mean_cosine = float(torch.nn.functional.cosine_similarity(first, second, dim=-1).mean())
        network.head.weight.zero_()
        network.cosine_scale.fill_(cosine_scale)
        network.head.bias.fill_(logit_from_likert(train_mean) - cosine_scale * mean_cosine)
    network.train(was_training)


def _validation_mse(model: CrossEncoderRewardModel, rows: Sequence[TrainingRow]) -> tuple[float, list[float]]:
    predictions = model.predict([row.query for row in rows])
    mse = math.fsum((p - row.agreement) ** 2 for p, row in zip(predictions, rows)) / len(rows)
    return mse, predictions


def train_cross_encoder(
    rows: Sequence[TrainingRow],
    config: TrainingConfig | None = None,
    *,
    on_epoch: EpochCallback | None = None,
) -> TrainingResult:
    """Fine-tune MiniLM as a cross-encoder regressor; returns the best model and its metrics."""
    config = config or TrainingConfig()
    if not rows:
        raise DatasetError("no training rows")
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    train_rows, validation_rows = split_by_group(rows, config.validation_fraction, config.seed)
    train_mean = math.fsum(row.agreement for row in train_rows) / len(train_rows)

    model = CrossEncoderRewardModel.from_base(
        config.base_model, device=config.device, max_length=config.max_length, encoder_layers=config.encoder_layers
    )
    network = model.network
    _initialise_head(model, train_rows, train_mean, config.initial_cosine_scale)

    encoder_parameters = _trainable_encoder_parameters(network.encoder, config.trainable_layers)
    optimizer = torch.optim.AdamW(
        [
            {"params": encoder_parameters, "lr": config.learning_rate},
            {"params": [*network.head.parameters(), network.cosine_scale], "lr": config.head_learning_rate},
        ],
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = len(participant_batches(train_rows, config.batch_size, random.Random(0)))
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _linear_schedule(total_steps, max(1, round(config.warmup_fraction * total_steps)))
    )

    history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_loss = math.inf
    best_epoch = 0
    epochs_without_improvement = 0
    train_seconds = 0.0
    rows_seen = 0
    for epoch in range(1, config.epochs + 1):
        network.train()
        epoch_loss = 0.0
        started = time.perf_counter()
        for batch in participant_batches(train_rows, config.batch_size, rng):
            targets = torch.tensor([row.agreement for row in batch], dtype=torch.float32, device=model.device)
            logits = model.logits([row.query for row in batch])
            loss = torch.nn.functional.mse_loss(likert_from_logit(logits), targets)
            if config.pairwise_weight > 0:
                pairwise = bradley_terry_loss(logits, targets, [row.participant_key for row in batch])
                if pairwise is not None:
                    loss = loss + config.pairwise_weight * pairwise
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            epoch_loss += float(loss.detach()) * len(batch)
            rows_seen += len(batch)
        train_seconds += time.perf_counter() - started
        record = {"epoch": float(epoch), "train_loss": epoch_loss / len(train_rows)}
        if validation_rows:
            record["validation_mse"], _ = _validation_mse(model, validation_rows)
            if record["validation_mse"] < best_loss:
                best_loss, best_epoch = record["validation_mse"], epoch
                best_state = {key: value.detach().clone() for key, value in network.state_dict().items()}
                epochs_without_improvement = 0
            else:
                epochs_without_improvement += 1
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if validation_rows and epochs_without_improvement > config.patience:
            break

    if best_state is not None:
        network.load_state_dict(best_state)
    network.eval()
    model.config.train_mean = train_mean
    sha = dataset_sha256(rows)
    model.config.dataset_sha256 = sha
    params = asdict(config)
    model.config.params = params

    metrics: dict[str, Any] = {
        "train_rows": len(train_rows),
        "validation_rows": len(validation_rows),
        "train_groups": len({row.group_id for row in train_rows}),
        "validation_groups": len({row.group_id for row in validation_rows}),
        "train_mean": train_mean,
        "epochs_run": len(history),
        "best_epoch": best_epoch or len(history),
        "train_rows_per_second": rows_seen / train_seconds if train_seconds > 0 else None,
    }
    if validation_rows:
        metrics["validation_mse"] = best_loss
        _, predictions = _validation_mse(model, validation_rows)
        rated = [row.rated() for row in validation_rows]
        baselines = similarity_baselines(config.base_model, device=config.device) if config.evaluate_baselines else {}
        metrics["validation"] = compare_with_baselines(rated, predictions, train_mean=train_mean, baselines=baselines)
    return TrainingResult(
        model=model, train_mean=train_mean, dataset_sha256=sha, metrics=metrics, params=params, history=history
    )


# --- synthetic data (tests, benchmarks, smoke training) -----------------------------

_OPINION_PREFIXES = (
    "I think that ",
    "In my view, ",
    "Honestly, I feel that ",
    "My position is simple: ",
    "I am convinced that ",
    "",
)
_OPINION_SUFFIXES = (
    "",
    " That is what matters most to me.",
    " I have thought about this a lot.",
    " Others may disagree, but I am sure.",
)
_STATEMENT_PREFIXES = (
    "We agree that ",
    "The group concludes that ",
    "On balance, ",
    "After discussion, we believe that ",
    "",
)


def _sentence_body(statement: str) -> str:
    """'Artificial intelligence will ...' -> 'artificial intelligence will ...' for mid-sentence use."""
    statement = statement.strip()
    if len(statement) > 1 and statement[0].isupper() and not statement[1].isupper():
        return statement[0].lower() + statement[1:]
    return statement


def make_synthetic_stance_rows(
    questions: Sequence[Mapping[str, str]],
    *,
    n_groups: int,
    participants_per_group: int = 4,
    statements_per_group: int = 6,
    noise: float = 0.6,
    seed: int = 0,
) -> list[TrainingRow]:
    """Ratings where agreement follows stance: participants hold a pro or con opinion,
    statements lean pro, con or neutral, and agreement = 4 + 2.5 * match + noise
    (match = +1 same stance, -1 opposite, 0 neutral), rounded and clipped to 1..7.

    `questions` need question, affirming_statement, negating_statement (the Habermas
    Machine bank's fields). Each group gets a distinct question and both stances.
    """
    usable = [
        q for q in questions if q.get("question") and q.get("affirming_statement") and q.get("negating_statement")
    ]
    if len(usable) < n_groups:
        raise ValueError(f"need {n_groups} questions with both statements, got {len(usable)}")
    if participants_per_group < 2:
        raise ValueError("participants_per_group must be >= 2 so both stances are present")
    rng = random.Random(seed)
    rows: list[TrainingRow] = []
    for group, item in enumerate(rng.sample(usable, n_groups)):
        sides = {+1: item["affirming_statement"], -1: item["negating_statement"]}
        stances = [+1, -1] + [rng.choice((+1, -1)) for _ in range(participants_per_group - 2)]
        rng.shuffle(stances)
        leanings = [(+1, -1, 0)[k % 3] for k in range(statements_per_group)]
        statements: list[tuple[int, str]] = []
        for leaning in leanings:
            if leaning == 0:
                text = rng.choice(
                    (
                        f"The group is divided on the question: {item['question']} Some of us say yes, others say no.",
                        f'There are reasonable arguments on both sides of the question "{item["question"]}"',
                        f'We could not settle whether the answer to "{item["question"]}" is yes or no.',
                    )
                )
            else:
                prefix = rng.choice(_STATEMENT_PREFIXES)
                body = sides[leaning] if not prefix else _sentence_body(sides[leaning])
                text = prefix + body
            statements.append((leaning, text))
        for participant, stance in enumerate(stances):
            prefix = rng.choice(_OPINION_PREFIXES)
            body = sides[stance] if not prefix else _sentence_body(sides[stance])
            opinion = prefix + body + rng.choice(_OPINION_SUFFIXES)
            for leaning, text in statements:
                match = stance * leaning
                agreement = min(LIKERT_MAX, max(LIKERT_MIN, round(4 + 2.5 * match + rng.gauss(0.0, noise))))
                rows.append(
                    TrainingRow(
                        group_id=f"g{group}",
                        participant_id=f"p{participant}",
                        question=item["question"],
                        opinion=opinion,
                        statement=text,
                        agreement=float(agreement),
                    )
                )
    return rows
