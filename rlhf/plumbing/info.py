"""The ServerInfo every GetInfo carries."""

from __future__ import annotations

from rlhf import API_VERSION, __version__
from rlhf.v1 import common_pb2


def server_info(service: str, ready: bool) -> common_pb2.ServerInfo:
    return common_pb2.ServerInfo(
        service=service, version=__version__, api_version=API_VERSION, ready=ready
    )
