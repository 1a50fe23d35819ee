"""The trainer service (rlhf.v1.TrainerService)."""
