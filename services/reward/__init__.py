"""The reward service (rlhf.v1.RewardService)."""
