"""Shared test helpers: run the real CLI in-process, and locate ../shared/data."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import pytest

from llmgen.cli import main

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LLMGEN_SHARED_DATA", REPO.parent / "shared" / "data"))
# the compile-plan timings this machine's runs record (generate.compile auto): the tests' own, so a
# record left by earlier runs never changes what a test does
os.environ["LLMGEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="llmgen-test-cache-")


def shared_file(name: str) -> Path:
    """A file from ../shared/data; the test is skipped when that folder is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not available (../shared/data is absent)")
    return path


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:
        pass


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """Run `llmgen ARGS...` in-process inside tmp_path; returns (exit_code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run
