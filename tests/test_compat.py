"""Checkpoints written by earlier llmgen versions keep loading and generating the same text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmgen.config import EngineOptions, GenerateConfig
from llmgen.generate.engine import Engine

FIXTURE = Path(__file__).parent / "fixtures" / "pre_redesign"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pre_redesign_checkpoint_generates_the_same_greedy_text(arch):
    # saved by commit 0ad8549 (before the model/kernels split), with the text it generated then
    want = json.loads((FIXTURE / "expected.json").read_text())[arch]
    engine = Engine.load(str(FIXTURE / arch), options=EngineOptions(device="cpu"))
    got = engine.generate([want["prompt"]], GenerateConfig(max_new_tokens=want["max_new_tokens"], temperature=0.0))
    assert got[0][0].tokens == want["tokens"]
    assert got[0][0].text == want["text"]
