"""Training: Ray Train + DeepSpeed ZeRO + W&B."""
