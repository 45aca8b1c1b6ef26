"""Direct preference optimisation of the generator with trl (framework-free: no Django).

Beyond the paper, which fine-tuned on good statements only (SFT): DPO (Rafailov et al. 2023) learns
from pairs, the statement a group preferred (`chosen`) over one it did not (`rejected`), for the same
prompt. The pairs come from build_preference_dataset (modeling.training.study_data): trl's
conversational format, whose prompt is the generator's own chat (prompts.build_messages), rendered
by trl through the tokenizer's chat template with the generation prompt, as TransformersGenerator
renders it.

LoRA on the same projections as SFT. Two starting points:
- the base model: a fresh adapter; the reference policy is the base (trl disables the adapter);
- an SFT adapter (the parent version): its LoRA weights are trained further, and trl keeps a frozen
  copy of them as the reference, so DPO moves the policy away from the SFT model, not the base.
Either way the result is ONE LoRA adapter over the base model, so it loads, is verified by sha256
and is merged exactly like an SFT adapter (models.load_adapter_source, concord-adapter.json).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
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
from modeling.generation.transformers_backend import _usable_cpu_count

from .sft import DEFAULT_LORA_TARGETS
from .study_data import PreferencePair

logger = logging.getLogger(__name__)

# Called as on_progress(step, total_steps, loss) after every optimiser step.
DPOProgress = Callable[[int, int, float], None]


@dataclass
class DPOHyperParameters:
    beta: float
    epochs: int
    max_steps: int | None
    learning_rate: float
    batch_size: int
    max_length: int
    seed: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    parent_adapter_sha256: str = ""


@dataclass
class DPOResult:
    # DPO loss on the held-out pairs before and after (ln 2 before: the policy starts as the reference).
    loss_before: float
    loss_after: float
    # Share of held-out pairs where the policy prefers the chosen statement more than the reference does.
    eval_reward_accuracy: float
    eval_reward_margin: float
    train_rows: int
    eval_rows: int
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
    hyperparameters: dict[str, Any]
    seconds: float
    train_losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def pairs_sha256(pairs: Sequence[PreferencePair]) -> str:
    """sha256 of the pairs (canonical JSON, in order): names exactly what was trained on."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps(pair.as_trl(), sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _dataset(pairs: Sequence[PreferencePair]) -> Any:
    from datasets import Dataset

    return Dataset.from_list([pair.as_trl() for pair in pairs])


def train_dpo(
    *,
    base_model: str,
    pairs: Sequence[PreferencePair],
    eval_pairs: Sequence[PreferencePair] = (),
    out_dir: str | Path,
    parent_adapter: str | Path | None = None,
    parent_adapter_sha256: str | None = None,
    beta: float = 0.1,
    epochs: int = 1,
    max_steps: int | None = None,
    learning_rate: float = 5e-5,
    batch_size: int = 2,
    max_length: int = 768,
    seed: int = 0,
    lora_r: int = 8,
    lora_alpha: int = 16,
    on_progress: DPOProgress | None = None,
    device: str = "auto",
    cache_dir: Path | None = None,
    num_threads: int | None = None,
) -> DPOResult:
    """Train a LoRA adapter with DPO on `pairs`; save it (with concord-adapter.json) to `out_dir`."""
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    if not pairs:
        raise ValueError("no preference pairs to train on")
    started = time.perf_counter()
    source = resolve_model(base_model)
    resolved_device = resolve_device(device)
    if resolved_device == "cpu":
        torch.set_num_threads(num_threads or _usable_cpu_count())
    location, _ = ensure_checkpoint_dir(source, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(location)

    parent = None
    if parent_adapter:
        parent = verify_adapter(parent_adapter, parent_adapter_sha256)
        if parent.kind != "lora":
            raise ValueError("DPO continues a LoRA adapter; a full fine-tune cannot be a parent here.")
        if parent.base_sha256 and source.sha256 and parent.base_sha256 != source.sha256:
            raise ValueError(f"The parent adapter was trained on another base (sha256 {parent.base_sha256}).")
    hp = DPOHyperParameters(
        beta=beta, epochs=epochs, max_steps=max_steps, learning_rate=learning_rate, batch_size=batch_size,
        max_length=max_length, seed=seed, lora_r=lora_r, lora_alpha=lora_alpha,
        parent_adapter_sha256=parent.sha256 if parent else "",
    )

    torch.manual_seed(seed)
    model: Any = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    peft_config = None
    if parent is not None:
        # Train the parent's own LoRA further; trl keeps a frozen copy of it as the reference ("ref").
        model = PeftModel.from_pretrained(model, parent.path, is_trainable=True)
    else:
        peft_config = LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=hp.lora_dropout, target_modules=list(hp.lora_targets),
            bias="none", task_type="CAUSAL_LM",
        )
    steps_per_epoch = math.ceil(len(pairs) / batch_size)
    total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    losses: list[float] = []

    class Progress(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs and "eval_loss" not in logs:
                losses.append(float(logs["loss"]))
                if on_progress is not None:
                    on_progress(state.global_step, total_steps, losses[-1])

    scratch = Path(tempfile.mkdtemp(prefix="dpo-trainer-"))
    try:
        config = DPOConfig(
            output_dir=str(scratch),
            beta=beta,
            learning_rate=learning_rate,
            num_train_epochs=epochs,
            max_steps=total_steps,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=batch_size,
            max_length=max_length,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=seed,
            use_cpu=resolved_device == "cpu",
            bf16=resolved_device.startswith("cuda") and torch.cuda.is_bf16_supported(),
            warmup_steps=max(0, int(total_steps * 0.05)),
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            dataloader_num_workers=0,
            disable_tqdm=True,
            # A 135M model fits without it; recomputing activations only slows a CPU run down.
            gradient_checkpointing=False,
        )
        eval_dataset = _dataset(eval_pairs) if eval_pairs else None
        trainer = DPOTrainer(
            model=model,
            args=config,
            train_dataset=_dataset(pairs),
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Progress()],
        )
        # Progress goes to on_progress (and the run's log), not as dicts printed to stdout.
        trainer.remove_callback(PrinterCallback)
        before = trainer.evaluate() if eval_dataset is not None else {}
        trainer.train()
        after = trainer.evaluate() if eval_dataset is not None else {}
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Only the trained adapter: trl's frozen "ref" copy is not part of the result.
        trained: Any = trainer.model  # the PeftModel (transformers types it as a plain module)
        trained.save_pretrained(out, selected_adapters=["default"], safe_serialization=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    digest, size = adapter_digest(out)
    nan = float("nan")
    result = DPOResult(
        loss_before=float(before.get("eval_loss", nan)),
        loss_after=float(after.get("eval_loss", nan)),
        eval_reward_accuracy=float(after.get("eval_rewards/accuracies", nan)),
        eval_reward_margin=float(after.get("eval_rewards/margins", nan)),
        train_rows=len(pairs),
        eval_rows=len(eval_pairs),
        dataset_sha256=pairs_sha256(pairs),
        eval_dataset_sha256=pairs_sha256(eval_pairs),
        base_model=source.model_id,
        base_model_sha256=source.sha256,
        base_model_revision=source.revision,
        adapter_sha256=digest,
        adapter_bytes=size,
        out_dir=str(out),
        device=resolved_device,
        steps=int(trainer.state.global_step),
        first_train_loss=losses[0] if losses else nan,
        last_train_loss=losses[-1] if losses else nan,
        hyperparameters={**asdict(hp), "lora_targets": list(hp.lora_targets)},
        seconds=time.perf_counter() - started,
        train_losses=losses,
    )
    manifest = {"kind": "lora", "method": "dpo", **result.as_dict()}
    (out / ADAPTER_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return result
