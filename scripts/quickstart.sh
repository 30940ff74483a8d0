#!/usr/bin/env bash
# The offline quickstart lifecycle on the embedded defaults (configs/quickstart.yaml):
# prepare -> pretrain -> finetune -> eval -> generate. Each step is a plain llmgen command;
# run them one by one to see what each does.
set -euo pipefail
llmgen prepare
llmgen pretrain --overwrite
llmgen finetune --overwrite
llmgen eval --model runs/quickstart/final --model runs/quickstart/finetune/final --output runs/quickstart/eval.json
llmgen generate "Once upon a time"
