"""`llmgen eval`: generate predictions with the engine, score them, and write a readable report.

run_eval() returns a report dict: one entry per model with every metric, its configuration
(data hash, generation settings, sacrebleu signature, library versions), and per-example scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata as md
import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llmgen import ui
from llmgen.version import __version__
from llmgen.atomic import atomic_write_text
from llmgen.config import Config, EngineOptions
from llmgen.data.instruct import prompt_reference_pairs
from llmgen.data.records import field, read_records
from llmgen.data.shards import TokenShards
from llmgen.data.sources import Corpus
from llmgen.errors import LlmgenError
from llmgen.evaluate.metrics import ALL_METRICS, load_metric
from llmgen.evaluate.perplexity import perplexity, windows
from llmgen.generate.engine import Engine
from llmgen.kernels.training import keep_freed_memory

DEFAULT_PAIRS = "builtin:instructions:eval"


def parse_metrics(spec: Optional[str], default: list[str]) -> list[str]:
    names = [m.strip() for m in spec.split(",")] if spec else list(default)
    names = [m for m in names if m]
    if not names:
        raise LlmgenError(f"--metrics is empty; choose from {', '.join(ALL_METRICS)}")
    for m in names:
        if m != "ppl" and not m.startswith("hf:"):
            load_metric(m)  # unknown names fail here, with the list of available ones
    return names


def _versions() -> dict[str, str]:
    out = {"llmgen": __version__}
    for pkg in ("torch", "transformers", "sacrebleu", "rouge-score", "evaluate"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


DEFAULT_WINDOW = 8192  # tokens of context per perplexity window where eval.window is unset and the model's is longer


def ppl_tokens(cfg: Config, tok, data: Optional[str]) -> tuple[np.ndarray, Optional[int], str, str]:
    """(token ids, bytes of text, description, sha256) of the perplexity data for this tokenizer."""
    source = data or cfg.eval.data
    if source is None:  # the prepared val.bin where it was made with this tokenizer, else the built-in stories
        meta = Path(cfg.data.prepared_dir) / "meta.json"
        try:
            fits = meta.is_file() and json.loads(meta.read_text()).get("tokenizer_sha256") in (None, tok.sha256())
        except (OSError, ValueError):
            fits = False
        if not fits:
            why = "was prepared with another tokenizer" if meta.is_file() else "has no prepared data"
            ui.info(f"ppl: {cfg.data.prepared_dir} {why}; measuring on builtin:stories (--data FILE.txt for your text)")
            source = "builtin:stories"
    if source is None or (Path(source).is_dir() and (Path(source) / "meta.json").is_file()):
        shards = TokenShards(source or cfg.data.prepared_dir)
        if shards.meta.get("tokenizer_sha256") not in (None, tok.sha256()):
            raise LlmgenError(f"{shards.folder} was prepared with a different tokenizer than this model's; pass "
                              f"--data FILE.txt (any text) to measure perplexity on raw text")
        ids = np.asarray(shards.tokens("val"), dtype=np.int64)
        if len(ids) < 2:
            raise LlmgenError(f"{shards.folder}/val.bin is empty; prepare with data.val_fraction > 0 or pass --data")
        return ids, shards.meta.get("val_bytes"), f"{shards.folder}/val.bin", hashlib.sha256(ids.tobytes()).hexdigest()[:16]
    texts: list[str] = []
    path = Path(source)
    if path.suffix == ".jsonl" and path.is_file():
        for rec, where in read_records(str(path), what="--data"):
            texts.append(field(rec, cfg.data.text_field, where, "set data.text_field to the field with the text"))
    else:  # any data.source form: .txt/.json/.parquet/.csv files, folders, globs, hf:<name>, builtin:stories
        dc = dataclasses.replace(cfg.data, source=source,
                                 builtin_documents=200 if source.startswith("builtin:") else cfg.data.builtin_documents,
                                 seed=cfg.data.seed + 99 if source.startswith("builtin:") else cfg.data.seed)
        texts = ["".join(doc.pieces) for doc in Corpus(dc).documents()]
    texts = [t for t in texts if t]
    if not texts:
        raise LlmgenError(f"--data {source} holds no text")
    ids = []
    for i, t in enumerate(texts):
        ids += tok.encode(t) + ([tok.eot_id] if i < len(texts) - 1 else [])
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    sha = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    return np.asarray(ids, dtype=np.int64), n_bytes, source, sha


def read_predictions(path: Path) -> tuple[list[str], list[list[str]], list[str]]:
    """(predictions, references, prompts) of a --predictions file: records with `prediction` and
    `reference` (a string or a list of strings), optionally `prompt`."""
    preds, refs, prompts = [], [], []
    for rec, where in read_records(str(path), what="--predictions"):
        for key in ("prediction", "reference"):
            if not isinstance(rec, dict) or key not in rec:
                raise LlmgenError(f"{where}: missing field `{key}`; each record needs `prediction` and `reference`")
        ref = rec["reference"]
        preds.append(str(rec["prediction"]))
        refs.append([ref] if isinstance(ref, str) else [str(r) for r in ref])
        prompts.append(str(rec.get("prompt", "")))
    if not preds:
        raise LlmgenError(f"--predictions {path} is empty")
    return preds, refs, prompts


def score(metrics: list[str], preds: list[str], refs: list[list[str]], cfg: Config) -> tuple[dict, dict, list[dict]]:
    """(scores, metric configs, per-example scores) for the generation metrics."""
    if len(preds) != len(refs):
        raise LlmgenError(f"{len(preds)} predictions but {len(refs)} references; they must pair up one to one")
    empty = sum(not any(r.strip() for r in rs) for rs in refs)
    if empty and empty == len(refs):
        raise LlmgenError(f"all {empty} references are empty, so every score would be 0; give each example a "
                          f"`reference` (or `completion`/`output`) text")
    if empty:
        ui.info(f"{empty} of {len(refs)} references are empty; those examples score 0")
    scores, configs, per = {}, {}, [dict() for _ in preds]
    for m in metrics:
        if m == "ppl":
            continue
        metric = load_metric(m)
        kwargs = {"aggregation": cfg.eval.aggregation, "seed": cfg.eval.seed} if m == "rouge" else {}
        if m.startswith("hf:"):
            res = metric.compute(predictions=preds, references=refs)
        else:
            res = metric.compute(predictions=preds, references=refs, **kwargs)
        ex = res.pop("per_example", None)
        sig = res.pop("signature", None)
        configs[m] = {"signature": sig} if sig else {}
        if m == "rouge":
            configs[m]["aggregation"] = cfg.eval.aggregation
            configs[m]["use_stemmer"] = True
        for k, v in res.items():
            if isinstance(v, (int, float)):
                scores[k] = float(v)
            else:
                scores[f"{k}"] = v
        if ex is not None:
            for d, v in zip(per, ex):
                d.update(v if isinstance(v, dict) else {m: v})
    return scores, configs, per


def eval_model(cfg: Config, model: Optional[str], metrics: list[str], data: Optional[str],
               preds_file: Optional[Path] = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"scores": {}, "config": {}}
    gen_metrics = [m for m in metrics if m != "ppl"]
    if preds_file is not None and "ppl" not in metrics:
        preds, refs, prompts = read_predictions(preds_file)
        entry["model"] = None
        entry["config"]["data"] = {"predictions": str(preds_file),
                                   "sha256": hashlib.sha256(Path(preds_file).read_bytes()).hexdigest()[:16]}
    else:
        quantize = cfg.generate.quantize
        if not gen_metrics and quantize in (None, "auto"):
            quantize = "none"  # perplexity alone never decodes: fp16 weights would only cost their packing
        engine = Engine.load(model, cfg.run_dir, EngineOptions(dtype=cfg.generate.dtype, quantize=quantize,
                                                                    compile=cfg.generate.compile,
                                                                    work="decode" if gen_metrics else "score"))
        entry["model"] = str(engine.source)
        entry["config"]["quantize"] = quantize
        entry["config"]["engine"] = engine.describe()
        ui.info(f"model: {engine.source} ({engine.n_params / 1e6:.1f}M parameters; {engine.describe()})")
        if "ppl" in metrics:
            ids, n_bytes, desc, sha = ppl_tokens(cfg, engine.tok, data if not gen_metrics else None if data and
                                                 Path(data).suffix == ".jsonl" else data)
            if engine.device.type == "cpu":  # long windows' activations: reused, not faulted in afresh each forward
                keep_freed_memory()  # (SmolLM2, 10k tokens: 8.5 -> 0.9 s of system time, 6 % of the wall time)
            max_len = min(cfg.eval.window or DEFAULT_WINDOW, engine.cfg.max_seq_len)
            n_w = len(windows(len(ids), max_len, min(cfg.eval.stride or max_len // 2, max_len)))
            with ui.progress("perplexity", n_w, unit="windows") as bar:
                res = perplexity(engine.model, ids, n_bytes, cfg.eval.stride, max_len, cfg.eval.batch_size,
                                 engine.device, progress=bar.advance)
            entry["scores"].update({"ppl": res.ppl, "loss_nats_per_token": res.loss})
            if res.bits_per_byte is not None:
                entry["scores"]["bits_per_byte"] = res.bits_per_byte
            entry["config"]["ppl"] = {"data": desc, "sha256": sha, "tokens": res.tokens, "stride": cfg.eval.stride or max_len // 2,
                                      "window": max_len, "tokens_per_s": round(res.tokens / max(res.seconds, 1e-9), 1)}
        if not gen_metrics:
            return entry
        if preds_file is not None:
            preds, refs, prompts = read_predictions(preds_file)
        else:
            src = data if data and not Path(data).is_dir() and not data.endswith(".txt") else (cfg.eval.data or DEFAULT_PAIRS)
            pairs = prompt_reference_pairs(src, max_examples=cfg.eval.max_samples, seed=cfg.data.seed)
            p = dataclasses.replace(cfg.generate, stream=False, num_return_sequences=1, num_beams=cfg.generate.num_beams,
                                    temperature=cfg.generate.temperature if cfg.eval.sample else 0.0,
                                    seed=cfg.eval.seed)
            preds, refs, prompts = [], [r for _, r in pairs], [m[-1]["content"] for m, _ in pairs]
            engine.plan(-(-len(pairs) // cfg.eval.batch_size) * p.max_new_tokens, f"{len(pairs)} predictions")
            if engine.compile_why:
                entry["config"]["engine"] = engine.describe()
                ui.info(f"decode step: {'compiled' if engine.compiling else 'eager'} ({engine.compile_why})")
            t0 = time.perf_counter()
            with ui.progress("predict", len(pairs), unit="examples") as bar:
                for i in range(0, len(pairs), cfg.eval.batch_size):
                    chunk = [m for m, _ in pairs[i:i + cfg.eval.batch_size]]
                    preds += [c[0].text.strip() for c in engine.generate(chunk, p)]
                    bar.advance(len(chunk))
            entry["config"]["generation"] = {**dataclasses.asdict(p), "seconds": round(time.perf_counter() - t0, 2)}
            entry["config"]["data"] = {"source": src, "examples": len(pairs),
                                       "sha256": hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]}
    scores, configs, per = score(gen_metrics, preds, refs, cfg)
    entry["scores"].update(scores)
    entry["config"].update(configs)
    entry["examples"] = [{"prompt": pr, "reference": r if len(r) > 1 else r[0], "prediction": pd, **s}
                         for pr, r, pd, s in zip(prompts, refs, preds, per)]
    return entry


def run_eval(cfg: Config, models: list[Optional[str]], metrics: list[str], data: Optional[str] = None,
             predictions: Optional[Path] = None, output: Optional[Path] = None, samples: int = 0) -> dict[str, Any]:
    if predictions is not None and len(models) > 1:
        raise LlmgenError("--predictions scores one set of outputs; drop the extra --model options")
    entries = [eval_model(cfg, m, metrics, data, predictions) for m in (models or [None])]
    report = {"metrics": metrics, "results": entries, "versions": _versions(), "eval": dataclasses.asdict(cfg.eval)}
    if output is not None:
        atomic_write_text(Path(output), json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if samples:
        base = Path(output).with_suffix("") if output else Path("eval")
        for j, e in enumerate(entries):
            ex = e.get("examples", [])[:samples]
            tag = f".{j}" if len(entries) > 1 else ""
            atomic_write_text(Path(f"{base}{tag}.samples.jsonl"), "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in ex))
            md = [f"# Samples from {e.get('model') or predictions}\n"]
            for i, x in enumerate(ex, 1):
                md.append(f"## {i}\n\n**Prompt**\n\n{x['prompt']}\n\n**Reference**\n\n{x['reference']}\n\n"
                          f"**Prediction**\n\n{x['prediction']}\n")
            atomic_write_text(Path(f"{base}{tag}.samples.md"), "\n".join(md))
    if len(entries) > 1:
        chart = (Path(output).with_suffix(".png") if output else Path("eval_compare.png"))
        plot_comparison(entries, chart)
        report["chart"] = str(chart)
    return report


def plot_comparison(entries: list[dict], path: Path) -> None:
    import matplotlib  # heavy (~0.5 s); only when a chart is written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in entries[0]["scores"] if isinstance(entries[0]["scores"][k], float)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    names = [Path(e["model"]).parent.name + "/" + Path(e["model"]).name if e["model"] else "predictions" for e in entries]
    for ax, k in zip(axes[0], keys):
        ax.bar(range(len(entries)), [e["scores"].get(k, 0.0) for e in entries], color="tab:blue")
        ax.set_xticks(range(len(entries)), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(k)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
