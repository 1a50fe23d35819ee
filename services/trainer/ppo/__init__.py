"""RL on a running policy and reward (PPO, GRPO, RLOO): the learner, its model, checkpoints and
update, `rlhf train ppo`, and the runs TrainerService starts."""
