"""The generator's training methods: the one registry of their names (framework-free).

`train_generator --method`, the researcher's training form, the TrainingRun record and
GeneratorVersion.training_method all take their choices from TRAINING_METHODS, so a method's name
exists here only.

- sft: supervised fine-tuning on consensus statements (question, opinions, statement), the paper's
  method (Bakker et al. 2022 fine-tuned on statements that raters judged of high quality);
  modeling/training/sft.py.
- dpo: direct preference optimisation (Rafailov et al. 2023) on chosen/rejected statement pairs from
  the rankings and head-to-head preferences a study collected; beyond the paper;
  modeling/training/dpo.py.
"""

from __future__ import annotations

SFT = "sft"
DPO = "dpo"

TRAINING_METHODS: dict[str, str] = {
    SFT: "SFT (supervised, on highly rated statements)",
    DPO: "DPO (preferences: chosen vs rejected statements)",
}


def training_method_choices() -> list[tuple[str, str]]:
    """Callable choices for model fields and forms (adding a method needs no migration)."""
    return list(TRAINING_METHODS.items())


def check_training_method(name: str) -> str:
    if name not in TRAINING_METHODS:
        raise ValueError(f"Unknown training method {name!r}; known methods: {', '.join(TRAINING_METHODS)}.")
    return name
