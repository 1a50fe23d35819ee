# syntax=docker/dockerfile:1.7
# The HTTP gateway, slim: no torch, no vLLM, no model. The project's own code is installed
# without its dependencies; the gateway's are listed in gateway-requirements.txt (a test checks
# that list against what `rlhf serve gateway` imports).
# Build with scripts/build_images.sh: the build context is the repository's tracked files.
# Bases, pinned to exact versions (add @sha256 digests at release: docs/operations.md).
FROM python:3.11.13-slim-bookworm AS python-base

FROM python-base AS cpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY constraints/ constraints/
COPY deploy/docker/gateway-requirements.txt deploy/docker/
COPY rlhf/ rlhf/
COPY services/ services/
COPY gateway/ gateway/
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir -c constraints/cpu.txt \
      -r deploy/docker/gateway-requirements.txt \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps .

FROM python-base AS cpu
RUN groupadd --gid 10001 rlhf \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin rlhf \
 && mkdir -p /data && chown 10001:10001 /data
COPY --from=cpu-build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/rlhf/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp \
    RLHF_HOME=/data RLHF_GATEWAY_HOST=0.0.0.0
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "/opt/rlhf/healthcheck.py", "http", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["rlhf", "serve", "gateway"]
