"""The reward service (rlhf.v1.RewardService): scores (prompt, completion) pairs with a weighted
sum of learned reward models, built-in rules and user Python functions."""
