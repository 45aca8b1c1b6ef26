"""Supervised fine-tuning of the generator on hand-written consensus statements (framework-free).

A training example is one group (question, opinions, target statement) shown in one opinion order.
Its prompt is built by the generator's own code: `prompts.build_messages` with an order from
`prompts.opinion_order`, neutralised opinions, rendered through the tokenizer's chat template with
the generation prompt appended, tokenised without extra special tokens; exactly the tokens
`TransformersGenerator` feeds the model. The target is the statement's tokens followed by the
end-of-turn token, so the tuned model learns to stop. The loss is on those target tokens only.

Training is a plain PyTorch loop (no trainer framework): LoRA (peft) on the attention and MLP
projections by default, or full fine-tuning (`lora=False`, fine for a 135M model). Logits are
computed only at target positions, which on a 49k vocabulary saves most of the head's cost.

The adapter directory holds peft's files (adapter_config.json, adapter_model.safetensors) and
`concord-adapter.json`: the adapter's sha256 (see `adapter_digest`), the base model and the
sha256 of its GGUF, the dataset's sha256, the hyper-parameters and the losses. The generator
refuses an adapter whose files no longer match that digest (models.load_adapter_source).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modeling.generation.models import (
    ADAPTER_MANIFEST,
    adapter_digest,
    ensure_checkpoint_dir,
    resolve_device,
    resolve_model,
    verify_adapter,
)
from modeling.generation.prompts import ChatMessage, RevisionContext, build_messages, derive_seed, opinion_order, render_chat
from modeling.generation.transformers_backend import _usable_cpu_count

logger = logging.getLogger(__name__)

# Attention and MLP projections of Llama-family models (SmolLM2, Llama, Qwen, Mistral).
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE_INDEX = -100

# Called as on_progress(step, total_steps, loss) after every optimiser step.
SFTProgress = Callable[[int, int, float], None]


class SFTDataError(ValueError):
    """A consensus group is malformed; the message names the file and line."""


@dataclass(frozen=True)
class ConsensusGroup:
    group_id: str
    question: str
    opinions: tuple[str, ...]
    statement: str
    # A revision example (the seed's optional "revision"): one critique per member, and the revised statement.
    critiques: tuple[str, ...] = ()
    revised_statement: str = ""


@dataclass(frozen=True)
class SFTExample:
    """One group in one opinion order, with the target statement."""

    group_id: str
    question: str
    opinions: tuple[str, ...]
    order: tuple[int, ...]
    statement: str
    # A revision example: the statement critiqued and one critique per opinion; `statement` is then the revision.
    previous_statement: str = ""
    critiques: tuple[str, ...] = ()

    def prompt_messages(self, extra_special_tokens: Sequence[str] = ()) -> list[ChatMessage]:
        """The system and user turns, exactly as the generator builds them for this order (and, for a revision
        example, exactly as a critique round's mediation does)."""
        revision = RevisionContext(self.previous_statement, self.critiques) if self.critiques else None
        return build_messages(self.question, self.opinions, self.order, extra_special_tokens=extra_special_tokens, revision=revision)

    def messages(self, extra_special_tokens: Sequence[str] = ()) -> list[ChatMessage]:
        return [*self.prompt_messages(extra_special_tokens), {"role": "assistant", "content": self.statement}]


def group_from_mapping(raw: Any, where: str) -> ConsensusGroup:
    if not isinstance(raw, Mapping):
        raise SFTDataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    question, opinions, statement = raw.get("question"), raw.get("opinions"), raw.get("statement")
    if not isinstance(question, str) or not question.strip():
        raise SFTDataError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(opinions, list) or not opinions or not all(isinstance(o, str) and o.strip() for o in opinions):
        raise SFTDataError(f"{where}: 'opinions' must be a non-empty list of non-empty strings")
    if not isinstance(statement, str) or not statement.strip():
        raise SFTDataError(f"{where}: 'statement' must be a non-empty string")
    group_id = str(raw.get("group_id") or where)
    critiques: tuple[str, ...] = ()
    revised = ""
    revision = raw.get("revision")
    if revision is not None:
        if not isinstance(revision, Mapping):
            raise SFTDataError(f"{where}: 'revision' must be an object with critiques and revised_statement")
        listed, rewritten = revision.get("critiques"), revision.get("revised_statement")
        if not isinstance(listed, list) or len(listed) != len(opinions) or not all(isinstance(c, str) and c.strip() for c in listed):
            raise SFTDataError(f"{where}: 'revision.critiques' must hold one non-empty critique per opinion")
        if not isinstance(rewritten, str) or not rewritten.strip():
            raise SFTDataError(f"{where}: 'revision.revised_statement' must be a non-empty string")
        critiques, revised = tuple(listed), rewritten.strip()
    return ConsensusGroup(group_id, question, tuple(opinions), statement.strip(), critiques, revised)


def load_groups(paths: Iterable[str | Path]) -> list[ConsensusGroup]:
    """Read consensus groups from JSONL files (fields question, opinions[], statement; see the seed GUIDE)."""
    groups: list[ConsensusGroup] = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as error:
                    raise SFTDataError(f"{where}: invalid JSON ({error})") from error
                groups.append(group_from_mapping(raw, where))
    return groups


def _revision_of(group: Any) -> tuple[tuple[str, ...], str]:
    """(critiques, revised statement) of a group from either loader (empty when it has no revision example)."""
    if getattr(group, "critiques", ()):
        return tuple(group.critiques), group.revised_statement
    revision = getattr(group, "revision", None)  # consensus_data.ConsensusGroup
    if revision is not None:
        return tuple(revision.critiques), revision.revised_statement
    return (), ""


def build_sft_examples(
    groups: Sequence[Any], *, seed: int, shuffles_per_group: int = 1, revisions: bool = False
) -> list[SFTExample]:
    """`shuffles_per_group` examples per group, each in the opinion order the generator would use
    for sample index 0, 1, ... of a request seeded with derive_seed(seed, group). With `revisions`, a group
    with a revision example adds as many more: the revision prompt (the statement as the previous one, the
    critiques) in the same orders, with the revised statement as the target."""
    if shuffles_per_group < 1:
        raise ValueError("shuffles_per_group must be at least 1")
    examples = []
    for index, raw in enumerate(groups):
        # A mapping (a JSON line), or any group object with these fields (consensus_data.ConsensusGroup too).
        group = group_from_mapping(raw, f"group {index}") if isinstance(raw, Mapping) else raw
        group_seed = derive_seed("sft", seed, group.group_id, index)
        for sample_index in range(shuffles_per_group):
            order = tuple(opinion_order(group_seed, sample_index, len(group.opinions)))
            examples.append(SFTExample(group.group_id, group.question, group.opinions, order, group.statement))
        critiques, revised = _revision_of(group) if revisions else ((), "")
        for sample_index in range(shuffles_per_group if critiques else 0):
            order = tuple(opinion_order(derive_seed("sft-revision", group_seed), sample_index, len(group.opinions)))
            examples.append(
                SFTExample(group.group_id, group.question, tuple(group.opinions), order, revised, group.statement, critiques)
            )
    return examples


def dataset_sha256(examples: Sequence[SFTExample]) -> str:
    """sha256 of the examples (canonical JSON, in order): names exactly what was trained on."""
    digest = hashlib.sha256()
    for example in examples:
        fields = asdict(example)
        if not example.critiques:
            # A first-round example hashes as it did before revision examples existed.
            del fields["previous_statement"], fields["critiques"]
        digest.update(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# --- tokenisation ---------------------------------------------------------------------


@dataclass
class TokenizedExample:
    input_ids: list[int]
    # IGNORE_INDEX on the prompt, the token id on the statement and its end-of-turn token.
    labels: list[int]


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that closes the assistant's turn (<|im_end|> for ChatML); the generator stops on it."""
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            return token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer defines no end-of-turn or end-of-sequence token")
    return int(tokenizer.eos_token_id)


def tokenize_example(tokenizer: Any, example: SFTExample, *, end_id: int | None = None) -> TokenizedExample:
    special = [str(token) for token in tokenizer.all_special_tokens]
    # Exactly what TransformersGenerator feeds the model: render_chat + no added special tokens.
    prompt = render_chat(tokenizer, example.prompt_messages(special))
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(example.statement, add_special_tokens=False)["input_ids"]
    target_ids = [*target_ids, end_of_turn_id(tokenizer) if end_id is None else end_id]
    return TokenizedExample(input_ids=prompt_ids + target_ids, labels=[IGNORE_INDEX] * len(prompt_ids) + target_ids)


# --- training -------------------------------------------------------------------------


@dataclass
class SFTHyperParameters:
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    epochs: int = 1
    max_steps: int | None = None
    learning_rate: float = 2e-4
    batch_size: int = 4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_len: int = 512
    seed: int = 0
    # A LoRA adapter training continued from (its sha256), blank: a fresh adapter.
    init_adapter_sha256: str = ""


@dataclass
class SFTResult:
    loss_before: float
    loss_after: float
    train_rows: int
    eval_rows: int
    # Rows dropped because prompt + statement exceed max_seq_len.
    skipped_too_long: int
    dataset_sha256: str
    eval_dataset_sha256: str
    base_model: str
    base_model_sha256: str | None
    base_model_revision: str
    adapter_sha256: str
    adapter_bytes: int
    out_dir: str
    device: str
    steps: int
    first_train_loss: float
    last_train_loss: float
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    # Mean training loss of each optimiser step, in order.
    train_losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _batches(rows: list[TokenizedExample], batch_size: int, rng: random.Random) -> list[list[TokenizedExample]]:
    """Shuffled batches of similar length (sorted within windows of 16 batches): less padding."""
    order = rows[:]
    rng.shuffle(order)
    window = batch_size * 16
    batches: list[list[TokenizedExample]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda row: len(row.input_ids))
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def _collate(batch: Sequence[TokenizedExample], pad_id: int, device: str) -> dict[str, Any]:
    import torch

    width = max(len(row.input_ids) for row in batch)
    input_ids = [row.input_ids + [pad_id] * (width - len(row.input_ids)) for row in batch]
    labels = [row.labels + [IGNORE_INDEX] * (width - len(row.labels)) for row in batch]
    mask = [[1] * len(row.input_ids) + [0] * (width - len(row.input_ids)) for row in batch]
    return {
        "input_ids": torch.tensor(input_ids, device=device),
        "attention_mask": torch.tensor(mask, device=device),
        "labels": torch.tensor(labels, device=device),
    }


def _target_nll(lm: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Summed NLL of the target tokens and their count; logits only where a target is predicted."""
    import torch.nn.functional as F

    hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    selected = labels != IGNORE_INDEX
    logits = lm.get_output_embeddings()(hidden[:, :-1][selected]).float()
    return F.cross_entropy(logits, labels[selected], reduction="sum"), int(selected.sum())


def evaluate_loss(lm: Any, rows: Sequence[TokenizedExample], *, pad_id: int, device: str, batch_size: int = 8) -> float:
    """Mean per-token NLL of the target tokens of `rows` (the held-out loss)."""
    import torch

    if not rows:
        return float("nan")
    was_training = lm.training
    lm.eval()
    total, count = 0.0, 0
    ordered = sorted(rows, key=lambda row: len(row.input_ids))
    with torch.inference_mode(), _autocast(device):
        for start in range(0, len(ordered), batch_size):
            nll, n = _target_nll(lm, _collate(ordered[start : start + batch_size], pad_id, device))
            total += float(nll)
            count += n
    lm.train(was_training)
    return total / max(count, 1)


def _autocast(device: str) -> Any:
    import contextlib

    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return contextlib.nullcontext()


def _tokenize_all(tokenizer: Any, examples: Sequence[SFTExample], max_seq_len: int) -> tuple[list[TokenizedExample], int]:
    end_id = end_of_turn_id(tokenizer)
    rows, skipped = [], 0
    for example in examples:
        row = tokenize_example(tokenizer, example, end_id=end_id)
        if len(row.input_ids) > max_seq_len:
            skipped += 1
            continue
        rows.append(row)
    return rows, skipped


def train_sft(
    *,
    base_model: str,
    examples: Sequence[SFTExample],
    eval_examples: Sequence[SFTExample],
    out_dir: str | Path,
    lora: bool = True,
    epochs: int = 1,
    max_steps: int | None = None,
    learning_rate: float | None = None,
    seed: int = 0,
    on_progress: SFTProgress | None = None,
    batch_size: int = 4,
    max_seq_len: int = 512,
    lora_r: int = 8,
    lora_alpha: int = 16,
    device: str = "auto",
    cache_dir: Path | None = None,
    num_threads: int | None = None,
    evaluate_before: bool = True,
    init_adapter: str | Path | None = None,
    init_adapter_sha256: str | None = None,
) -> SFTResult:
    """Fine-tune `base_model` on `examples`, save the adapter (or full weights) to `out_dir`.

    With `init_adapter` (a LoRA adapter over the same base, verified by sha256), training continues
    that adapter's weights, so a version trained on a study's statements builds on its parent.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    parent = verify_adapter(init_adapter, init_adapter_sha256) if init_adapter else None
    if parent is not None and (not lora or parent.kind != "lora"):
        raise ValueError("Only a LoRA adapter can be continued, and only by LoRA training.")
    hp = SFTHyperParameters(
        init_adapter_sha256=parent.sha256 if parent else "",
        lora=lora,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        epochs=epochs,
        max_steps=max_steps,
        learning_rate=learning_rate if learning_rate is not None else (2e-4 if lora else 2e-5),
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        seed=seed,
    )
    source = resolve_model(base_model)
    resolved_device = resolve_device(device)
    if resolved_device == "cpu":
        # As the generator does: the cgroup's cores, not the host's (oversubscription is slower).
        torch.set_num_threads(num_threads or _usable_cpu_count())
    location, _ = ensure_checkpoint_dir(source, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(location)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)

    train_rows, skipped = _tokenize_all(tokenizer, examples, max_seq_len)
    eval_rows, eval_skipped = _tokenize_all(tokenizer, eval_examples, max_seq_len)
    if not train_rows:
        raise ValueError("no training example fits in max_seq_len")

    torch.manual_seed(seed)
    # Any: transformers' and peft's stubs type the model, its wrapper and `to` inconsistently.
    model: Any = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    model.to(resolved_device)
    if parent is not None:
        from peft import PeftModel

        if parent.base_sha256 and source.sha256 and parent.base_sha256 != source.sha256:
            raise ValueError(f"The adapter to continue was trained on another base (sha256 {parent.base_sha256}).")
        model = PeftModel.from_pretrained(model, parent.path, is_trainable=True)
        lm = model.get_base_model()
    elif lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=list(hp.lora_targets),
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
        lm = model.get_base_model()
    else:
        lm = model
    model.config.use_cache = False

    loss_before = evaluate_loss(lm, eval_rows, pad_id=pad_id, device=resolved_device) if evaluate_before else float("nan")

    rng = random.Random(seed)
    steps_per_epoch = math.ceil(len(train_rows) / batch_size)
    total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    warmup = max(1, int(total_steps * hp.warmup_ratio)) if total_steps > 1 else 0

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses: list[float] = []
    step = 0
    while step < total_steps:
        for batch_rows in _batches(train_rows, batch_size, rng):
            if step >= total_steps:
                break
            batch = _collate(batch_rows, pad_id, resolved_device)
            with _autocast(resolved_device):
                nll, count = _target_nll(lm, batch)
            loss = nll / max(count, 1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss.item())
            if on_progress is not None:
                on_progress(step, total_steps, losses[-1])

    loss_after = evaluate_loss(lm, eval_rows, pad_id=pad_id, device=resolved_device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if lora:
        model.save_pretrained(out, safe_serialization=True)
    else:
        model.config.use_cache = True
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    digest, size = adapter_digest(out)
    result = SFTResult(
        loss_before=loss_before,
        loss_after=loss_after,
        train_rows=len(train_rows),
        eval_rows=len(eval_rows),
        skipped_too_long=skipped + eval_skipped,
        dataset_sha256=dataset_sha256(examples),
        eval_dataset_sha256=dataset_sha256(eval_examples),
        base_model=source.model_id,
        base_model_sha256=source.sha256,
        base_model_revision=source.revision,
        adapter_sha256=digest,
        adapter_bytes=size,
        out_dir=str(out),
        device=resolved_device,
        steps=step,
        first_train_loss=losses[0] if losses else float("nan"),
        last_train_loss=losses[-1] if losses else float("nan"),
        hyperparameters={**asdict(hp), "lora_targets": list(hp.lora_targets)},
        seconds=time.perf_counter() - started,
        train_losses=losses,
    )
    manifest = {"kind": "lora" if lora else "full", **result.as_dict()}
    (out / ADAPTER_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Fine-tune the generator on consensus statements.")
    parser.add_argument("--train", nargs="+", required=True, help="JSONL files of training groups")
    parser.add_argument("--dev", required=True, help="JSONL file of held-out groups (evaluation only)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--shuffles", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--limit", type=int, help="use only the first N training groups")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    groups = load_groups(args.train)[: args.limit]
    examples = build_sft_examples(groups, seed=args.seed, shuffles_per_group=args.shuffles)
    eval_examples = build_sft_examples(load_groups([args.dev]), seed=args.seed + 1, shuffles_per_group=1)
    started = time.perf_counter()

    def progress(step: int, total: int, loss: float) -> None:
        if step == 1 or step % 10 == 0 or step == total:
            elapsed = time.perf_counter() - started
            logger.info("step %d/%d loss %.4f (%.0fs, eta %.0fs)", step, total, loss, elapsed, elapsed / step * (total - step))

    result = train_sft(
        base_model=args.base_model,
        examples=examples,
        eval_examples=eval_examples,
        out_dir=args.out,
        lora=not args.full,
        epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        seed=args.seed,
        on_progress=progress,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        lora_r=args.lora_r,
        device=args.device,
        cache_dir=args.cache_dir,
    )
    summary = {key: value for key, value in result.as_dict().items() if key != "train_losses"}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
