"""precise-lightning: GRPO post-training of flow-matching models with the Precise sampler."""
