#!/usr/bin/env bash
# The offline quickstart lifecycle on the embedded defaults (configs/quickstart.yaml).
# Each step is a plain llmgen command; run them one by one to see what each does.
set -euo pipefail
llmgen prepare
llmgen pretrain --overwrite
