"""The closed feedback loop: users' preference pairs from the gateway become new reward-model
versions in the reward service (`rlhf loop rm`)."""
