"""The policy service (rlhf.v1.PolicyService)."""
