"""rlhf-grpc: the shared contract (rlhf.v1), service plumbing, model tools and the `rlhf` CLI."""

__version__ = "0.1.0"
API_VERSION = "rlhf.v1"
