"""The stance head: a small MLP on frozen MiniLM embeddings of (question, opinion, statement).

Each text is embedded once by the sentence encoder (similarity.py: mean-pooled,
L2-normalised MiniLM); a query (q, o, s) becomes a feature vector built only from
*relations* between the texts, never from the texts' own embeddings, so the head
cannot memorise topics (the variants table in docs/reward-model.md shows that the
raw embeddings overfit the training questions):

    r(x) = normalise(e(x) - (e(x).e(q)) e(q))      the text minus its question direction (stance residual)
    features = [ |e(o)-e(s)|, e(o)*e(s),             how the two texts differ / share, per dimension
                 |r(o)-r(s)|, r(o)*r(s),             the same after removing the topic everyone shares
                 cos(o,s), cos(r(o),r(s)), e(o).e(q), e(s).e(q) ]   four scalars

    raw = 1 + 6 * sigmoid(W2 gelu(W1 features + b1) + b2)
    agreement = clip(a + b * raw, 1, 7)          (a, b): affine calibration, b > 0, so the order is unchanged

trained with MSE on the 1-7 scale plus a Bradley-Terry loss over each member's
pairs of candidates (modeling/training/reward_head.py). The weights are a .npz of
float32 arrays; `load_head` verifies the file's sha256 before reading it and
refuses a mismatch. Scoring P members x N candidates costs one encoder pass over
the P + N + 1 distinct texts plus a matrix product.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .base import LIKERT_MAX, LIKERT_MIN, AgreementQuery
from .similarity import SentenceEncoder

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped" / "stance-head"
# sha256 of SHIPPED_DIR/head.npz; load_head refuses any other file. Update it only together with
# the file and its PROVENANCE.md (python -m modeling.training.reward_head --out SHIPPED_DIR).
SHIPPED_SHA256 = "ad4e8a27b66dff87a96f650721fd8b4984bf2d1ca39f4da60bceec06bf977922"
WEIGHTS_FILE = "head.npz"
SHA256_FILE = "head.npz.sha256"
CONFIG_FILE = "config.json"
FEATURE_SETS = ("pair", "pair+stance", "relations", "relations+stance", "scalars")


class ChecksumError(RuntimeError):
    """The shipped weights do not match the sha256 pinned in code: they were changed or corrupted."""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _residual(vectors: np.ndarray, question: np.ndarray) -> np.ndarray:
    residual = vectors - (vectors * question).sum(axis=-1, keepdims=True) * question
    norm = np.linalg.norm(residual, axis=-1, keepdims=True)
    return residual / np.maximum(norm, 1e-9)


def features(question: np.ndarray, opinion: np.ndarray, statement: np.ndarray, feature_set: str) -> np.ndarray:
    """Row-aligned embeddings (n x d each, unit norm) -> the head's input (n x k), float32.

    pair:              [e(o), e(s), |e(o)-e(s)|, e(o)*e(s)] + cos(o,s)
    relations:         [|e(o)-e(s)|, e(o)*e(s)] + the four scalars
    relations+stance:  relations + [|r(o)-r(s)|, r(o)*r(s)] (question direction removed)
    pair+stance:       pair + cos(r(o),r(s)), e(o).e(q), e(s).e(q)
    scalars:           the four scalars only (a calibrated question-aware similarity)
    """
    if feature_set not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {feature_set!r}; known: {', '.join(FEATURE_SETS)}")
    o, s, q = opinion.astype(np.float32), statement.astype(np.float32), question.astype(np.float32)
    cos = (o * s).sum(axis=-1, keepdims=True)
    if feature_set == "pair":
        return np.concatenate([o, s, np.abs(o - s), o * s, cos], axis=-1).astype(np.float32)
    ro, rs = _residual(o, q), _residual(s, q)
    scalars = [cos, (ro * rs).sum(axis=-1, keepdims=True), (o * q).sum(axis=-1, keepdims=True), (s * q).sum(axis=-1, keepdims=True)]
    if feature_set == "scalars":
        return np.concatenate(scalars, axis=-1).astype(np.float32)
    if feature_set == "pair+stance":
        return np.concatenate([o, s, np.abs(o - s), o * s, *scalars], axis=-1).astype(np.float32)
    parts = [np.abs(o - s), o * s]
    if feature_set == "relations+stance":
        parts += [np.abs(ro - rs), ro * rs]
    return np.concatenate(parts + scalars, axis=-1).astype(np.float32)


@dataclass
class HeadWeights:
    """The MLP: hidden = gelu(x W1 + b1); agreement = 1 + 6 sigmoid(hidden w2 + b2)."""

    w1: np.ndarray  # (k, h)
    b1: np.ndarray  # (h,)
    w2: np.ndarray  # (h,)
    b2: np.ndarray  # ()
    feature_set: str
    # (a, b): agreement = clip(a + b * raw, 1, 7), fitted on out-of-fold predictions; (0, 1) is none.
    calibration: np.ndarray = field(default_factory=lambda: np.array([0.0, 1.0], dtype=np.float32))
    # Bottom layers of the encoder the head was trained on (None: all). Stored in head.npz, so the
    # checksum covers it: the same weights on another encoder depth would score nonsense.
    encoder_layers: int | None = None

    def raw(self, x: np.ndarray) -> np.ndarray:
        hidden = torch.nn.functional.gelu(torch.from_numpy(x @ self.w1 + self.b1)).numpy()
        logit = hidden @ self.w2 + self.b2
        return LIKERT_MIN + (LIKERT_MAX - LIKERT_MIN) / (1.0 + np.exp(-logit))

    def predict(self, x: np.ndarray) -> np.ndarray:
        a, b = (float(v) for v in self.calibration)
        return np.clip(a + b * self.raw(x), LIKERT_MIN, LIKERT_MAX)

    def save(self, directory: str | Path, extra_config: dict | None = None) -> str:
        """Write head.npz and config.json; returns the sha256 of head.npz."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / WEIGHTS_FILE
        with path.open("wb") as handle:
            np.savez(
                handle,
                w1=self.w1,
                b1=self.b1,
                w2=self.w2,
                b2=self.b2,
                calibration=self.calibration,
                feature_set=np.array(self.feature_set),
                encoder_layers=np.array(self.encoder_layers or 0, dtype=np.int64),
            )
        config = {"feature_set": self.feature_set, **(extra_config or {})}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        digest = file_sha256(path)
        (directory / SHA256_FILE).write_text(digest + "\n", encoding="utf-8")
        return digest


def load_shipped_or_directory(directory: str | Path | None) -> tuple[HeadWeights, dict, str]:
    """(head, config, version): the shipped head checked against SHIPPED_SHA256, or a trained
    directory checked against the head.npz.sha256 written next to it when it was saved."""
    if directory is None:
        directory, expected = SHIPPED_DIR, SHIPPED_SHA256
    else:
        directory = Path(directory)
        sha_file = directory / SHA256_FILE
        if not sha_file.is_file():
            raise FileNotFoundError(f"{directory} has no {SHA256_FILE}: cannot verify its stance-head weights")
        expected = sha_file.read_text(encoding="utf-8").strip()
    head = load_head(directory, expected)
    config = json.loads((Path(directory) / CONFIG_FILE).read_text(encoding="utf-8"))
    return head, config, f"stance-head-{expected[:16]}"


def load_head(directory: str | Path, expected_sha256: str | None) -> HeadWeights:
    """Read a head, after checking head.npz against `expected_sha256` (None: no check, for fresh training runs)."""
    directory = Path(directory)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no stance-head weights at {path}")
    if expected_sha256 is not None:
        actual = file_sha256(path)
        if actual != expected_sha256:
            raise ChecksumError(f"refusing to load {path}: sha256 {actual} does not match the pinned {expected_sha256}")
    config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    with np.load(path, allow_pickle=False) as arrays:
        return HeadWeights(
            w1=arrays["w1"].astype(np.float32),
            b1=arrays["b1"].astype(np.float32),
            w2=arrays["w2"].astype(np.float32),
            b2=arrays["b2"].astype(np.float32),
            feature_set=str(arrays["feature_set"]) if "feature_set" in arrays.files else str(config["feature_set"]),
            encoder_layers=(int(arrays["encoder_layers"]) or None) if "encoder_layers" in arrays.files else None,
            calibration=(
                arrays["calibration"].astype(np.float32) if "calibration" in arrays.files else np.array([0.0, 1.0], dtype=np.float32)
            ),
        )


class StanceHeadRewardModel:
    """RewardModel: the stance head over frozen sentence embeddings."""

    name = "stance-head"

    def __init__(self, encoder: SentenceEncoder, head: HeadWeights, version: str, train_mean: float | None = None) -> None:
        self.encoder = encoder
        self.head = head
        self.version = version
        # Mean rating of the training rows: the constant baseline reports compare against.
        self.train_mean = train_mean

    def predict(self, queries: Sequence[AgreementQuery]) -> list[float]:
        if not queries:
            return []
        texts: dict[str, int] = {}
        for query in queries:
            for text in (query.question, query.opinion, query.statement):
                texts.setdefault(text, len(texts))
        embeddings = self.encoder.encode(list(texts)).numpy()
        x = features(
            embeddings[[texts[q.question] for q in queries]],
            embeddings[[texts[q.opinion] for q in queries]],
            embeddings[[texts[q.statement] for q in queries]],
            self.head.feature_set,
        )
        return [float(score) for score in self.head.predict(x)]
