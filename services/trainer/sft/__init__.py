"""LoRA supervised fine-tuning (`rlhf train sft`): the adapter PPO starts from."""
