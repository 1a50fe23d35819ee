"""Pushing a finished DPO adapter to the policy replicas (`rlhf train dpo --push-to`), as the PPO
learner pushes its adapters: every replica, the base model's id and fingerprint, the admin
token; the version is the next one every replica accepts for the adapter's name."""

from __future__ import annotations

from pathlib import Path

from rlhf.clients.policy import PolicyClient
from rlhf.clients.push import PushResult
from rlhf.clients.retry import Backoff
from rlhf.formats import base_model_fingerprint
from rlhf.plumbing.auth import token_from
from services.trainer.dpo.settings import DPOSettings


async def push_adapter_folder(settings: DPOSettings, folder: Path) -> PushResult:
    """Pushes `folder` to every replica of settings.push_to; raises rlhf.clients' CallFailed
    (GaveUp when a replica stays unreachable or refuses), ConfigError for an unreadable token
    file."""
    s = settings
    token = token_from(s.admin_token, s.admin_token_file, "the policy's admin token")
    async with PolicyClient(s.push_to, s.client_tls,
                            backoff=Backoff(max_seconds=s.push_timeout_seconds)) as client:
        # Versions of a name only increase on a replica, and each replica keeps its own count:
        # the next version all of them accept is the largest of their next ones.
        version = 1
        for endpoint in client.endpoints():
            listed = await client.list_adapters(s.adapter_name, endpoint=endpoint)
            version = max(version, listed.next_version)
        return await client.push(folder, s.adapter_name, version, s.resolved_base_model_id(),
                                 token=token,
                                 base_model_fingerprint=base_model_fingerprint(s.model))
