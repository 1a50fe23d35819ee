"""Typed async clients of the services, shared by every caller of the contract (trainer,
gateway, stack, tools): retries with backoff, TLS from config, a deadline and a request id on
every call, `close()`, and errors that name the address and what to start.

    async with PolicyClient(["127.0.0.1:50051"], config.client_tls) as policy:
        response = await policy.generate(request)
"""

from rlhf.clients.base import ServiceClient, check_addresses, split_addresses
from rlhf.clients.errors import CallFailed, GaveUp
from rlhf.clients.policy import PolicyClient
from rlhf.clients.push import PushResult, admin_metadata, push_adapter, push_requests
from rlhf.clients.retry import NO_RETRY, RETRYABLE, Backoff
from rlhf.clients.reward import RewardClient
from rlhf.clients.trainer import TrainerClient

__all__ = [
    "NO_RETRY", "RETRYABLE", "Backoff", "CallFailed", "GaveUp", "PolicyClient", "PushResult",
    "RewardClient", "ServiceClient", "TrainerClient", "admin_metadata", "check_addresses",
    "push_adapter", "push_requests", "split_addresses",
]
