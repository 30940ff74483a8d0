"""The README's first set-up command runs scripts/quickstart.sh: the whole offline lifecycle on the embedded
defaults. It is run here as a user runs it, from an empty folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_script_runs_the_lifecycle_from_an_empty_folder(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run(["bash", str(REPO / "scripts" / "quickstart.sh")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "runs" / "quickstart" / "eval.json").read_text())
    pretrained, finetuned = (r["scores"] for r in report["results"])
    assert finetuned["bleu"] > pretrained["bleu"] and pretrained["ppl"] > 1  # the finetune learned the pairs
    assert (tmp_path / "runs" / "quickstart" / "finetune" / "final" / "model.safetensors").is_file()
    story = run.stdout.strip().splitlines()[-1]  # generate's text (the finetuned model's reply to the prompt)
    assert len(story.split()) >= 10 and "tokens/s" not in story, run.stdout[-500:]
