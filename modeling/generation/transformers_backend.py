"""Local generation with Hugging Face transformers: all n candidates in one batched generate().

Why one batch: a decoding step of a small model reads every weight once whatever the
batch size, so 16 rows per step cost far less than 16 separate steps; sampling the 16
candidates one at a time costs several times as much (see docs/benchmarks.md).

Each row has its own prompt (its own opinion order), but all rows start with the same
system message and question: that common prefix is prefilled once and its KV cache
shared by every row; the rest is padded to a common length.

Sampling is seeded with torch's global RNG, which generate() uses and which cannot be
passed in; a process-wide lock serialises generations so two threads cannot interleave
draws from it, and fork_rng() restores the RNG afterwards so other code in the process
is unaffected.

Latency: every candidate of a batch records the wall time of the generate() call that
produced it (rows of one batch finish together from the caller's point of view).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Candidate, GenerationError, GenerationRequest, ProgressCallback, SamplingParams
from .cleaning import (
    DEFAULT_CLEANING,
    CleaningOptions,
    ProgressReporter,
    RawSample,
    build_candidates,
    collect_statements,
)
from .models import DEFAULT_MODEL_ALIAS, LoadedModel, load_model
from .prompts import INSTRUCTION_TEXTS, ChatMessage, derive_seed, plan_prompts, render_chat

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# libgomp, torch's OpenMP runtime on Linux, keeps idle worker threads spinning. When other
# busy processes share the cores (the web server, the reward model, other workers), a thread
# spins while its peer is descheduled: batched generation ran 5-10x slower that way on our
# 2-core machine (docs/benchmarks.md). PASSIVE lets idle threads sleep. libgomp reads it once,
# when torch is first imported, so this only helps where nothing imported torch earlier;
# worker environments should set it too.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# generate() samples from torch's global RNG; see the module docstring.
_TORCH_RNG_LOCK = threading.Lock()
# Below this, sharing a prefix saves less than the extra forward pass costs.
MIN_SHARED_PREFIX_TOKENS = 16
# First guess at the nucleus size; grown as needed (see _temperature_nucleus_processor).
NUCLEUS_INITIAL_K = 256


@dataclass
class Completion:
    """One sampled continuation of one prompt."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    hit_token_limit: bool
    latency_ms: float


def _usable_cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _rows_finished_criteria(eos_ids: Sequence[int], on_change: Callable[[int], None]) -> Any:
    """A StoppingCriteria that never stops anything; it counts rows that produced EOS.

    generate() calls it after every decoding step, which is the only hook that sees
    rows finish while the batch is still running.
    """
    import torch
    from transformers import StoppingCriteria

    class RowsFinished(StoppingCriteria):
        def __init__(self) -> None:
            self.finished: torch.Tensor | None = None
            self.reported = 0
            self.eos = torch.tensor(list(eos_ids))

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            last = input_ids[:, -1]
            if self.finished is None:
                self.finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                self.eos = self.eos.to(input_ids.device)
            # Finished rows keep receiving the pad token, which for most chat models is EOS.
            self.finished |= torch.isin(last, self.eos)
            count = int(self.finished.sum())
            if count != self.reported:
                self.reported = count
                on_change(count)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return RowsFinished()


def _temperature_nucleus_processor(temperature: float, top_p: float) -> Any:
    """Temperature scaling, then top-p filtering that finds the nucleus with topk, not a full sort.

    The library's top-p warper sorts the whole vocabulary (49k entries for SmolLM2) for every
    row at every step: on two CPU cores that was about a fifth of a 16-row decoding step.
    The nucleus is almost always a few dozen tokens, so topk over a small k finds it; k
    grows until the top-k mass reaches top_p, so the result is the same set a full sort
    gives (the smallest prefix of the sorted distribution whose mass reaches top_p).
    Temperature is applied here too because generate() runs custom processors before its
    own warpers, and the nucleus must be taken after temperature scaling.
    """
    import torch
    from transformers import LogitsProcessor

    class TemperatureNucleus(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            scaled = scores / temperature
            if top_p >= 1.0:
                return scaled
            probabilities = scaled.float().softmax(dim=-1)
            vocabulary = probabilities.shape[-1]
            k = min(NUCLEUS_INITIAL_K, vocabulary)
            while True:
                top_probabilities, top_indices = probabilities.topk(k, dim=-1)  # sorted, largest first
                if k == vocabulary or bool((top_probabilities.sum(dim=-1) >= top_p).all()):
                    break
                k = min(k * 8, vocabulary)
            # Keep a token if the mass strictly before it is below top_p; always keep the most likely.
            mass_before = top_probabilities.cumsum(dim=-1) - top_probabilities
            keep = mass_before < top_p
            keep[:, 0] = True
            minus_infinity = torch.tensor(float("-inf"), dtype=scaled.dtype, device=scaled.device)
            kept = torch.where(keep, scaled.gather(-1, top_indices), minus_infinity)
            return torch.full_like(scaled, float("-inf")).scatter(-1, top_indices, kept)

    return TemperatureNucleus()


class TransformersGenerator:
    """Generator backed by a local transformers causal LM (default: SmolLM2-135M-Instruct)."""

    backend = "transformers"

    def __init__(
        self,
        model: str = DEFAULT_MODEL_ALIAS,
        *,
        device: str = "auto",
        cache_dir: Path | None = None,
        num_threads: int | None = None,
        dtype: torch.dtype | None = None,
        allow_hub_download: bool | None = None,
        cleaning: CleaningOptions = DEFAULT_CLEANING,
        share_prompt_prefix: bool = True,
        adapter: str | Path | None = None,
        adapter_sha256: str | None = None,
    ) -> None:
        """`adapter`: a fine-tuned adapter directory (modeling/training/sft.py), verified against
        `adapter_sha256` (or the digest its training recorded) and merged into the base; the model
        name may carry it instead, as ``<model>+adapter:<directory>[#sha256=<hex>]``."""
        import torch

        self.share_prompt_prefix = share_prompt_prefix
        self._loaded: LoadedModel = load_model(
            model,
            device=device,
            cache_dir=cache_dir,
            dtype=dtype,
            allow_hub_download=allow_hub_download,
            adapter=adapter,
            adapter_sha256=adapter_sha256,
        )
        if self._loaded.device == "cpu":
            # torch defaults to the physical core count, which in containers is often the
            # host's, not the cgroup's; oversubscribing two vCPUs makes decoding slower.
            torch.set_num_threads(num_threads or _usable_cpu_count())
        self.model_id = self._loaded.source.model_id
        self.model_revision = self._loaded.source.revision
        self.device = self._loaded.device
        self.load_seconds = self._loaded.load_seconds
        self.loaded_from_cache = self._loaded.loaded_from_cache
        self.cleaning = cleaning

        tokenizer = self._loaded.tokenizer
        if tokenizer.chat_template is None:
            raise GenerationError(f"{self.model_id} has no chat template; Concord needs an instruction-tuned model.")
        tokenizer.padding_side = "left"  # decoder-only: new tokens must follow the prompt directly
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        configured = self._loaded.model.generation_config.eos_token_id
        eos_ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        if not eos_ids:
            raise GenerationError(f"{self.model_id} defines no end-of-sequence token.")
        self._eos_ids = sorted(eos_ids)
        # Neutralised inside opinions in addition to the generic role-token patterns.
        self._special_tokens = [str(token) for token in tokenizer.all_special_tokens]

    @property
    def tokenizer(self) -> Any:
        return self._loaded.tokenizer

    @property
    def model(self) -> Any:
        return self._loaded.model

    # --- the Generator protocol -------------------------------------------------

    def generate(self, request: GenerationRequest, *, on_progress: ProgressCallback | None = None) -> list[Candidate]:
        return self._generate(request, on_progress=on_progress, batched=True)

    def generate_sequential(
        self, request: GenerationRequest, *, on_progress: ProgressCallback | None = None
    ) -> list[Candidate]:
        """One generate() call per candidate. Only for benchmarking against the batched path."""
        return self._generate(request, on_progress=on_progress, batched=False)

    # --- lower level, shared with the loopback OpenAI test server ----------------

    def render_chat(self, messages: list[ChatMessage]) -> str:
        return render_chat(self._loaded.tokenizer, messages)

    def sample_prompts(
        self,
        prompts: Sequence[str],
        *,
        sampling: SamplingParams,
        seed: int,
        batched: bool = True,
        on_rows_finished: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        """Sample one completion per prompt (prompts already rendered through the chat template)."""
        if not prompts:
            return []
        if sampling.max_new_tokens < 1:
            raise GenerationError("max_new_tokens must be at least 1")
        if batched:
            return self._sample_batch(list(prompts), sampling, seed, on_rows_finished)
        completions = []
        for row, prompt in enumerate(prompts):
            completions.extend(self._sample_batch([prompt], sampling, derive_seed(seed, "row", row), None))
            if on_rows_finished is not None:
                on_rows_finished(row + 1)
        return completions

    # --- internals ----------------------------------------------------------------

    def _generate(
        self, request: GenerationRequest, *, on_progress: ProgressCallback | None, batched: bool
    ) -> list[Candidate]:
        _validate_request(request)
        progress = ProgressReporter(request.n, on_progress)
        progress.update(0)
        accepted = 0

        def note_accepted(count: int) -> None:
            nonlocal accepted
            accepted = count
            progress.update(count)

        def sampler(indices: Sequence[int]) -> list[RawSample]:
            plans = plan_prompts(
                request.question, request.opinions, request.seed, indices, extra_special_tokens=self._special_tokens
            )
            prompts = [self.render_chat(plan.messages) for plan in plans]
            # The first index identifies the round, so every round draws fresh samples.
            round_seed = derive_seed("transformers", request.seed, indices[0])
            completions = self.sample_prompts(
                prompts,
                sampling=request.sampling,
                seed=round_seed,
                batched=batched,
                on_rows_finished=lambda finished: progress.update(accepted + finished),
            )
            return [
                RawSample(
                    text=completion.text,
                    sample_index=plan.sample_index,
                    prompt=prompt,
                    opinion_order=plan.opinion_order,
                    prompt_tokens=completion.prompt_tokens,
                    completion_tokens=completion.completion_tokens,
                    latency_ms=completion.latency_ms,
                    hit_token_limit=completion.hit_token_limit,
                    # Batched: one torch seed for the whole batch (its rows draw from one RNG); one by one:
                    # each row's own seed, as sample_prompts derives it.
                    sampling_seed=round_seed if batched else derive_seed(round_seed, "row", row),
                )
                for row, (plan, prompt, completion) in enumerate(zip(plans, prompts, completions))
            ]

        samples = collect_statements(
            sampler, request.n, options=self.cleaning, on_accepted=note_accepted, instructions=INSTRUCTION_TEXTS
        )
        progress.finish()
        return build_candidates(
            samples, backend=self.backend, model_id=self.model_id, model_revision=self.model_revision, seed=request.seed
        )

    def _sample_batch(
        self,
        prompts: list[str],
        sampling: SamplingParams,
        seed: int,
        on_rows_finished: Callable[[int], None] | None,
    ) -> list[Completion]:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        tokenizer, model = self._loaded.tokenizer, self._loaded.model
        # The chat template already contains BOS/role tokens; adding them again would double them.
        token_ids: list[list[int]] = [
            tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts
        ]
        generate_kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "eos_token_id": self._eos_ids,
            "pad_token_id": tokenizer.pad_token_id,
            "use_cache": True,
        }
        if sampling.temperature > 0:
            # Temperature and nucleus come from our own processor (see _temperature_nucleus_processor);
            # the library's are switched off, including its default top-k of 50: sampling is exactly
            # temperature + nucleus, as on vLLM and OpenAI-compatible servers.
            generate_kwargs.update(
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                logits_processor=LogitsProcessorList(
                    [_temperature_nucleus_processor(sampling.temperature, sampling.top_p)]
                ),
            )
        else:
            generate_kwargs.update(do_sample=False)
        if on_rows_finished is not None:
            generate_kwargs["stopping_criteria"] = StoppingCriteriaList(
                [_rows_finished_criteria(self._eos_ids, on_rows_finished)]
            )
        rng_devices = [torch.cuda.current_device()] if self.device.startswith("cuda") else []
        with _TORCH_RNG_LOCK, torch.random.fork_rng(devices=rng_devices), torch.inference_mode():
            torch.manual_seed(seed)
            started = time.perf_counter()
            try:
                inputs = self._prefill_shared_prefix(token_ids) if self.share_prompt_prefix else None
                if inputs is None:
                    inputs = self._left_padded(token_ids)
                output = model.generate(**inputs, **generate_kwargs)  # type: ignore[operator]  # typed as a Tensor attribute
            except (RuntimeError, ValueError) as error:
                raise GenerationError(f"{self.model_id} failed to generate: {error}") from error
            latency_ms = (time.perf_counter() - started) * 1000.0

        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        eos = set(self._eos_ids)
        completions = []
        for row, tokens in enumerate(new_tokens):
            end = next((position for position, token in enumerate(tokens) if token in eos), None)
            body = tokens if end is None else tokens[:end]
            completions.append(
                Completion(
                    # Special tokens are kept so cleaning can cut at a role token the model emitted mid-text.
                    text=str(tokenizer.decode(body, skip_special_tokens=False)),
                    prompt_tokens=len(token_ids[row]),
                    completion_tokens=len(tokens) if end is None else end + 1,
                    hit_token_limit=end is None,
                    latency_ms=latency_ms,
                )
            )
        return completions

    def _left_padded(self, token_ids: list[list[int]]) -> dict[str, Any]:
        """Decoder-only batching: pad on the left so every row's new tokens follow its prompt."""
        import torch

        width = max(len(ids) for ids in token_ids)
        pad = self._loaded.tokenizer.pad_token_id
        input_ids = [[pad] * (width - len(ids)) + ids for ids in token_ids]
        mask = [[0] * (width - len(ids)) + [1] * len(ids) for ids in token_ids]
        return {
            "input_ids": torch.tensor(input_ids, device=self.device),
            "attention_mask": torch.tensor(mask, device=self.device),
        }

    def _prefill_shared_prefix(self, token_ids: list[list[int]]) -> dict[str, Any] | None:
        """Prefill the rows' common token prefix once, and share its KV cache across the batch.

        All n prompts of a request start with the same system message and question, about a
        third of each prompt; prefilling them once instead of n times is most of what prefix
        caching buys vLLM. Rows become [prefix | padding | own suffix]: the attention mask hides
        the padding and generate() derives positions from the mask, so every row computes
        exactly what it would alone. Returns None (plain left padding) when there is nothing
        worth sharing or the model's cache cannot be shared this way.
        """
        import torch
        from transformers import DynamicCache

        if len(token_ids) < 2:
            return None
        shortest = min(len(ids) for ids in token_ids)
        shared = 0
        # Keep at least one token per row uncached: generate() needs an input to start from.
        while shared < shortest - 1 and all(ids[shared] == token_ids[0][shared] for ids in token_ids):
            shared += 1
        if shared < MIN_SHARED_PREFIX_TOKENS:
            return None
        model = self._loaded.model
        prefix = torch.tensor([token_ids[0][:shared]], device=self.device)
        try:
            cache = DynamicCache(config=model.config)
            model(input_ids=prefix, cache=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(len(token_ids))
        except (TypeError, AttributeError, NotImplementedError) as error:
            logger.info("Prefix sharing unavailable for %s (%s); prefilling each row in full.", self.model_id, error)
            return None
        suffixes = [ids[shared:] for ids in token_ids]
        width = max(len(suffix) for suffix in suffixes)
        pad = self._loaded.tokenizer.pad_token_id
        input_ids = [token_ids[0][:shared] + [pad] * (width - len(suffix)) + suffix for suffix in suffixes]
        mask = [[1] * shared + [0] * (width - len(suffix)) + [1] * len(suffix) for suffix in suffixes]
        return {
            "input_ids": torch.tensor(input_ids, device=self.device),
            "attention_mask": torch.tensor(mask, device=self.device),
            "cache": cache,
        }


def _validate_request(request: GenerationRequest) -> None:
    if request.n < 1:
        raise GenerationError(f"n must be at least 1, got {request.n}")
    if not request.opinions:
        raise GenerationError("a generation request needs at least one opinion")
