"""Training the mediator (framework-free: no Django imports).

- `consensus_data`: reads and validates the hand-written seed consensus groups
  (`modeling/data/consensus_*.jsonl`, datasheet docs/data/consensus-seed.md) and turns their agreement
  labels into reward-model rows (`python -m modeling.training.consensus_data reward-rows ...`).
- `sft`: supervised fine-tuning of the generator (LoRA by default) on those statements, with prompts
  built by the generation prompt code.
"""
