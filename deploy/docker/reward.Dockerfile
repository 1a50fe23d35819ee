# syntax=docker/dockerfile:1.7
# The reward service: rules, user Python functions and reward models (torch on CPU).
# One target, cpu: torch 2.13.0+cpu from PyTorch's CPU index, on Debian slim. Reward models are
# small encoders; CPU replicas scale out behind the headless Service.
# Build with scripts/build_images.sh: the build context is the repository's tracked files.
# Bases, pinned to exact versions (add @sha256 digests at release: docs/operations.md).
FROM python:3.11.13-slim-bookworm AS python-base

FROM python-base AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY constraints/ constraints/
COPY rlhf/ rlhf/
COPY services/ services/
COPY gateway/ gateway/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
      -c constraints/cpu.txt .

FROM python-base AS cpu
RUN groupadd --gid 10001 rlhf \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin rlhf \
 && mkdir -p /data && chown 10001:10001 /data
COPY --from=cpu-build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/rlhf/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
    RLHF_HOME=/data HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RLHF_REWARD_HOST=0.0.0.0
USER 10001:10001
WORKDIR /tmp
EXPOSE 50052 9102
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "/opt/rlhf/healthcheck.py", "grpc", "127.0.0.1:50052"]
ENTRYPOINT ["rlhf", "serve", "reward"]
