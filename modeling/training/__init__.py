"""Fine-tuning the generator (framework-free: no Django imports)."""
