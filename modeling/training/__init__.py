"""Training data for the mediator (framework-free): the hand-written seed consensus dataset and its loaders.

`consensus_data` reads and validates the group format of `modeling/data/consensus_*.jsonl` and turns the
groups' agreement labels into reward-model rows (`python -m modeling.training.consensus_data reward-rows ...`).
Datasheet: docs/data/consensus-seed.md.
"""
