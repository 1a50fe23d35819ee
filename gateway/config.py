"""Gateway configuration (env prefix RLHF_GATEWAY_, YAML via --config, flags)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from rlhf.clients import check_addresses
from rlhf.plumbing.auth import token_from
from rlhf.plumbing.config import AddressList, Settings


class GatewayConfig(Settings):
    model_config = SettingsConfigDict(Settings.model_config, env_prefix="RLHF_GATEWAY_")
    service = "gateway"

    http_port: int = Field(8080, ge=0, le=65535, description="HTTP port; 0 picks a free one.")
    policy_addr: AddressList = Field(
        default_factory=lambda: ["127.0.0.1:50051"],
        description="Policy replicas: host:port list or a dns:/// name (balanced per call).")
    reward_addr: AddressList = Field(
        default_factory=lambda: ["127.0.0.1:50052"],
        description="Reward replicas: host:port list or a dns:/// name (balanced per call).")
    api_keys: AddressList = Field(
        default_factory=list,
        description="Bearer keys accepted (comma separated); none = open, with a warning.")
    admin_api_keys: AddressList = Field(
        default_factory=list,
        description="Admin keys (comma separated): valid keys that may also export every "
                    "tenant's feedback (GET /v1/feedback/export).")
    rate_limit_per_minute: float = Field(
        600, ge=0,
        description="Requests per minute per API key (per client IP when open); 0 = off.")
    rate_limit_burst: int = Field(60, ge=1, description="Requests a key may make at once.")
    sequences_per_minute: float = Field(
        0, ge=0,
        description="Sequences per minute per API key (prompts x n; best_of counts what it "
                    "draws), spendable at once; 0 = off. A key holds at most this many in the "
                    "policy at once, plus what refills while they run: keep it well under the "
                    "policy's max_pending_sequences so one key cannot fill its admission.")
    tokens_per_minute: float = Field(
        0, ge=0,
        description="Tokens per minute per API key: prompt tokens + max_tokens per sequence, "
                    "charged up front and settled to the tokens used; 0 = off.")
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest request body (413).")
    max_n: int = Field(16, ge=1, description="Largest n / best_of per request.")
    max_prompts: int = Field(16, ge=1, description="Most prompts in one /v1/completions call.")
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when a request omits it.")
    upstream_timeout_seconds: float = Field(
        120, gt=0, description="Deadline of each Generate/Score call (504 beyond it).")
    adapter_name: str = Field(
        "policy", description="Adapter name that model ids `policy@vN` refer to.")
    feedback_db: str | None = Field(
        None, description="SQLAlchemy URL or SQLite path of the feedback store "
                          "(default: <data_dir>/gateway/feedback.db).")
    max_answers_per_tenant_per_day: int = Field(
        10_000, ge=0,
        description="Answers stored for feedback per tenant per UTC day; beyond it answers are "
                    "served but not stored (header X-Feedback-Stored: false); 0 = no limit.")
    feedback_retention_days: float = Field(
        90, ge=0, description="Stored answers and their feedback older than this are purged; "
                              "0 = kept forever.")
    feedback_purge_interval_seconds: float = Field(
        3600, gt=0, description="How often the purge runs (every replica runs it; it is "
                                "idempotent).")
    policy_admin_token: str | None = Field(
        None, repr=False, description="The policy's admin token: the canary activates or drops "
                                      "versions with it.")
    policy_admin_token_file: Path | None = Field(
        None, description="File holding policy_admin_token (when that is unset).")
    canary_fraction: float = Field(
        0.0, ge=0, le=0.5,
        description="Share of `policy` requests a staged version serves during its canary; "
                    "0 = no canary (staged versions are left to the trainer).")
    canary_min_requests: int = Field(
        200, ge=2, le=1_000_000,
        description="Scored answers per arm after which the canary's verdict is due.")
    canary_max_seconds: float = Field(
        3600, gt=0, le=7 * 86400,
        description="The verdict is due after this long whatever the counts (keep the "
                    "trainer's staging time longer).")
    canary_margin_sd: float = Field(
        0.2, ge=0, le=10,
        description="Non-inferiority margin of the reward test, in standard deviations of the "
                    "incumbent's rewards.")
    canary_alpha: float = Field(0.05, gt=0, lt=1, description="Level of the reward test.")
    canary_max_error_increase: float = Field(
        0.01, ge=0, le=1, description="Error rate the candidate may have above the incumbent's.")
    canary_max_latency_ratio: float = Field(
        1.5, ge=1, le=1000, description="Mean latency the candidate may have, as a multiple of "
                                        "the incumbent's.")
    canary_score_fraction: float = Field(
        1.0, gt=0, le=1,
        description="Share of unranked canary answers (completions, chat without best_of) "
                    "scored on the reward service; best-of-n answers are scored anyway.")
    canary_poll_seconds: float = Field(
        5.0, gt=0, le=3600,
        description="How often the gateway lists the replicas' adapters for staged versions.")
    # Model id reported by the OpenAI endpoints for `base`; informative only.
    served_model_name: str = Field("rlhf-grpc", description="Owner shown in /v1/models.")

    @field_validator("policy_addr", "reward_addr")
    @classmethod
    def _addresses(cls, addrs: list[str]) -> list[str]:
        return check_addresses(addrs)

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _no_blank_keys(cls, keys: list[str]) -> list[str]:
        if any(len(k) < 8 for k in keys):
            raise ValueError("API keys must be at least 8 characters")
        return keys

    def resolved_policy_admin_token(self) -> str | None:
        return token_from(self.policy_admin_token, self.policy_admin_token_file,
                          "the policy's admin token")

    def feedback_url(self) -> str:
        if self.feedback_db is None:
            path = self.data_dir / "gateway" / "feedback.db"
            path.parent.mkdir(parents=True, exist_ok=True)
            return f"sqlite:///{path}"
        if "://" in self.feedback_db:
            return self.feedback_db
        return f"sqlite:///{self.feedback_db}"
