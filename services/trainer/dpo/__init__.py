"""Direct preference optimisation (`rlhf train dpo`): a LoRA adapter on the policy model trained
on preference pairs, served by the policy like any adapter."""
