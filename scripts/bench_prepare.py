#!/usr/bin/env python
"""Benchmark `llmgen prepare` against a single-process `tokenizers` encode loop.

For each corpus size (built by repeating ../shared/data texts into a folder of ~1.4 MB files),
both sides encode the same files with the same BPE tokenizer (trained once, on the smallest
corpus), each in a fresh process, alternating; we report MB/s, peak RSS and the ratio.

    python scripts/bench_prepare.py --sizes 10,100,1000 --out bench_out/prepare.json

The anchor's rate does not depend on corpus size, so `--anchor-max-mb` lets it encode only the
first N MB of the large corpora (its MB/s is still comparable) to keep the run short.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import report

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

ANCHOR = r"""
import sys, time, glob
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
files = sorted(glob.glob(sys.argv[2] + "/*.txt"))
limit = float(sys.argv[3]) * 1e6
t0 = time.time(); nbytes = 0; ntok = 0
for f in files:
    text = open(f, encoding="utf-8").read()
    ntok += len(tok.encode(text, add_special_tokens=False).ids) + 1
    nbytes += len(text.encode())
    if nbytes >= limit:
        break
print(nbytes, ntok, time.time() - t0)
"""


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Run a command; return (wall seconds, peak RSS in MB, stdout)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{cmd} failed:\n{err}")
    return wall, usage.ru_maxrss / 1024, out


def build_corpus(folder: Path, mb: int) -> int:
    unit = (SHARED / "tinyshakespeare.txt").read_text() + "\n" + (SHARED / "wizard_of_oz.txt").read_text()
    folder.mkdir(parents=True, exist_ok=True)
    unit_bytes = len(unit.encode())
    n = max(1, round(mb * 1e6 / unit_bytes))
    for i in range(n):
        p = folder / f"part{i:05d}.txt"
        if not p.exists():
            p.write_text(unit)
    return n * unit_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--anchor-max-mb", type=float, default=100.0)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--out", default="bench_out/prepare.json")
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"{SHARED} not found")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_prepare_"))
    sizes = [int(s) for s in args.sizes.split(",")]
    llmgen = [sys.executable, "-m", "llmgen"]

    # One tokenizer for every size, trained on the smallest corpus.
    base = work / f"corpus{sizes[0]}"
    build_corpus(base, sizes[0])
    tok_dir = work / "tok"
    t_train, _, _ = run_measured(llmgen + ["prepare", "--set", f"data.source={base}", "--set",
                                            f"data.prepared_dir={tok_dir}", "--set",
                                            f"tokenizer.vocab_size={args.vocab_size}", "--force"])
    rows = []
    for mb in sizes:
        corpus = work / f"corpus{mb}"
        nbytes = build_corpus(corpus, mb)
        wall, rss, _ = run_measured(llmgen + ["prepare", "--set", f"data.source={corpus}", "--set",
                                              f"data.prepared_dir={work / f'out{mb}'}", "--set",
                                              "tokenizer.type=pretrained", "--set", f"tokenizer.path={tok_dir}",
                                              "--force"])
        a_wall, a_rss, out = run_measured([sys.executable, "-c", ANCHOR, str(tok_dir / "tokenizer.json"),
                                           str(corpus), str(args.anchor_max_mb)])
        a_bytes, a_tok, a_secs = out.split()
        ours = nbytes / 1e6 / wall
        anchor = float(a_bytes) / 1e6 / float(a_secs)
        meta = json.loads((work / f"out{mb}" / "meta.json").read_text())
        rows.append(dict(size_mb=round(nbytes / 1e6, 1), ours_mb_s=round(ours, 2), ours_rss_mb=round(rss),
                         ours_tokens=meta["train_tokens"] + meta["val_tokens"], ours_wall_s=round(wall, 1),
                         anchor_mb_s=round(anchor, 2), anchor_rss_mb=round(a_rss), anchor_mb=round(float(a_bytes) / 1e6, 1),
                         ratio=round(ours / anchor, 2)))
        print(json.dumps(rows[-1]), flush=True)
        import shutil

        shutil.rmtree(work / f"out{mb}", ignore_errors=True)
    print()
    report(args.out, dict(bpe_train_s_on_smallest=round(t_train, 1), vocab_size=args.vocab_size, rows=rows),
           ["corpus MB", "llmgen prepare MB/s", "peak RSS MB", "tokenizers loop MB/s", "loop RSS MB", "ratio"],
           [[r["size_mb"], r["ours_mb_s"], r["ours_rss_mb"], f"{r['anchor_mb_s']} (on {r['anchor_mb']} MB)",
             r["anchor_rss_mb"], f"{r['ratio']}x"] for r in rows])

if __name__ == "__main__":
    main()
