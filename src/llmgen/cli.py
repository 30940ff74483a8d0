"""The `llmgen` command: parse arguments, load the config, call one library function, print.

Each command imports its library function when it runs (the one place llmgen imports itself inside
functions): the library pulls in torch and transformers, which `llmgen --help` should not wait for.

Exit codes: 0 success, 2 a user error (one line on stderr: what, where, how to fix),
1 a bug (the traceback is shown with `--debug`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import signal
import sys
import threading
import traceback
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, Union

import click
import typer
from rich.console import Console
from rich.table import Table

from llmgen import ui
from llmgen.atomic import disk_full_error
from llmgen.config import Config, GenerateConfig, load_config, load_persona
from llmgen.errors import LlmgenError
from llmgen.version import __version__

app = typer.Typer(
    help="llmgen: prepare data, pretrain, finetune, evaluate and generate with decoder-only language models.\n\n"
         "Every command runs with no arguments on the embedded quickstart defaults, in this order: "
         "prepare, pretrain, finetune, eval, generate \"Once upon a time\".",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_state = {"debug": False}

ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="Experiment YAML file (see configs/). Omitted: the embedded quickstart defaults.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="Override one key, e.g. --set train.max_steps=100 (repeatable; values are YAML).")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Run or checkpoint directory, HF model folder, hf:<id> or .gguf (default: the newest run).")]
PrintOpt = Annotated[bool, typer.Option("--print-config", help="Print the resolved config as YAML and exit.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks and debug logs.")] = False,
) -> None:
    _state["debug"] = debug
    ui.set_verbosity(debug)


def _load(config: Optional[Path], overrides: Optional[list[str]], print_config: bool) -> Optional[Config]:
    cfg = load_config(config, overrides or [])
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return None
    return cfg


@app.command()
def prepare(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_config: PrintOpt = False,
    force: Annotated[bool, typer.Option("--force", help="Re-prepare even when the output is up to date.")] = False,
) -> None:
    """Train/load the tokenizer and write token shards (train.bin, val.bin, meta.json)."""
    cfg = _load(config, set_, print_config)
    if cfg is None:
        return
    from llmgen.data.prepare import prepare as run_prepare  # the library (torch, transformers): imported per command, so --help starts in a blink

    res = run_prepare(cfg, force=force)
    m = res.meta
    if res.up_to_date:
        ui.info(f"{res.folder} is up to date (same config and inputs); nothing to do. Use --force to redo it.")
        return
    mb = (m["train_bytes"] + m["val_bytes"]) / 1e6
    ui.info(f"prepared {res.folder}: {m['train_tokens']:,} train + {m['val_tokens']:,} val tokens "
            f"({m['train_documents']:,} + {m['val_documents']:,} documents), vocab {m['vocab_size']:,} "
            f"({m['tokenizer_type']}), {mb:.1f} MB in {res.seconds:.1f}s ({mb / max(res.seconds, 1e-9):.1f} MB/s)")


@app.command()
def pretrain(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_config: PrintOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in a run_dir holding another run.")] = False,
) -> None:
    """Pretrain a decoder-only Transformer from scratch on prepared token shards."""
    cfg = _load(config, set_, print_config)
    if cfg is None:
        return
    from llmgen.train.pretrain import pretrain as run_pretrain  # the library (torch, transformers): imported per command, so --help starts in a blink

    _report_done(run_pretrain(cfg, resume=resume, overwrite=overwrite))


def _report_done(res) -> None:
    if res.interrupted:
        return
    best = f", best val loss {res.best_val_loss:.4f}" if res.best_val_loss is not None else ""
    ui.info(f"done: {res.step} steps{best}; {res.tokens_per_s:,.0f} tokens/s, peak memory {res.peak_memory_mb:,.0f} MB; "
            f"model in {res.final_dir} (metrics.jsonl and loss.png in {res.run_dir})")


@app.command()
def finetune(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_config: PrintOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in a finetune run_dir holding another run.")] = False,
    merge: Annotated[bool, typer.Option("--merge", help="LoRA: also write a merged full model to <run>/merged.")] = False,
) -> None:
    """Finetune a pretrained or imported model (full, LoRA or freeze) on instructions or text."""
    cfg = _load(config, set_, print_config)
    if cfg is None:
        return
    if merge:
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, merge=True))
    from llmgen.train.finetune import finetune as run_finetune  # the library (torch, transformers): imported per command, so --help starts in a blink

    _report_done(run_finetune(cfg, resume=resume, overwrite=overwrite))


def _eval(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_config: PrintOpt = False,
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Run or checkpoint directory (repeat to compare).")] = None,
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="Comma-separated: ppl,bleu,rouge,chrf or hf:<name>.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Text (.txt/.jsonl) or prepared folder for ppl; jsonl examples for bleu/rouge.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write results as JSON.")] = None,
    predictions: Annotated[Optional[Path], typer.Option("--predictions", help="Score existing outputs (jsonl: prediction, reference).")] = None,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Write N (prompt, reference, prediction) triples for review.")] = 0,
    max_samples: Annotated[Optional[int], typer.Option("--max-samples", min=1, help="Evaluate at most N examples.")] = None,
) -> None:
    """Evaluate models: perplexity (and bits per byte), BLEU, chrF, ROUGE."""
    cfg = _load(config, set_, print_config)
    if cfg is None:
        return
    if max_samples:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, max_samples=max_samples))
    from llmgen.evaluate.runner import parse_metrics, run_eval  # the library (torch, transformers): imported per command, so --help starts in a blink

    names = parse_metrics(metrics, cfg.eval.metrics)
    if predictions is not None and model is None:
        names = [m for m in names if m != "ppl"] if metrics is None else names
        if "ppl" in names:
            raise LlmgenError("ppl needs a model; drop it from --metrics when scoring --predictions")
    report = run_eval(cfg, list(model or [None]), names, data, predictions, output, samples)
    _print_report(report, output)


def _print_report(report: dict, output: Optional[Path]) -> None:
    results = report["results"]
    keys = []
    for e in results:  # headline numbers; the JSON output has everything
        keys += [k for k, v in e["scores"].items() if isinstance(v, float) and k not in keys and k != "brevity_penalty"]
    table = Table(title="llmgen eval")
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    for e in results:
        table.add_row(str(e["model"] or "predictions"), *[f"{e['scores'][k]:.4f}" if k in e["scores"] else "-" for k in keys])
    Console(width=max(100, 12 * len(keys) + 40)).print(table)
    for e in results:
        sig = e["config"].get("bleu", {}).get("signature")
        if sig:
            ui.info(f"sacrebleu signature: {sig}")
    if output:
        ui.info(f"results written to {output}" + (f"; chart {report['chart']}" if "chart" in report else ""))


app.command("eval")(_eval)
app.command("evaluate", help="Alias of `llmgen eval`.")(_eval)


def _flag_type(tp: Any) -> Any:
    """The type typer parses a generate.* key's flag as (Optional[X] -> X, a Literal -> str; the config
    then validates the value as it validates YAML)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is Literal or (args and typing.get_origin(args[0]) is Literal):
        return str
    if typing.get_origin(tp) in (Union, types.UnionType):
        return args[0]
    return tp


def generate_flags(command: Callable) -> Callable:
    """Give a command one flag per generate.* config key (--max-new-tokens, --top-p, --stream/--no-stream ...),
    typed and documented by GenerateConfig's fields, so a new sampling option is added in one place. The
    command receives them as `flags`, a dict of the values given (flags left out are not in it)."""
    hints = typing.get_type_hints(GenerateConfig)
    generated = []
    for f in dataclasses.fields(GenerateConfig):
        name = "--" + f.name.replace("_", "-")
        decls = [f"{name}/--no-{name[2:]}"] if _flag_type(hints[f.name]) is bool else [name]
        if f.metadata.get("short"):
            decls.append(f.metadata["short"])
        option = typer.Option(*decls, help=f.metadata.get("help"), rich_help_panel="Generation (generate.* keys)")
        generated.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                           annotation=Annotated[Optional[_flag_type(hints[f.name])], option]))

    @functools.wraps(command)
    def wrapper(**kwargs):
        flags = {f.name: kwargs.pop(f.name) for f in dataclasses.fields(GenerateConfig)}
        return command(flags={k: v for k, v in flags.items() if v is not None and v != []}, **kwargs)

    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "flags"]
    wrapper.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + generated)
    wrapper.__annotations__ = {}
    return wrapper


@app.command()
@generate_flags
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="Prompt text (omit with --input-file).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_config: PrintOpt = False,
    model: ModelOpt = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt (instruction-tuned models).")] = None,
    input_file: Annotated[Optional[Path], typer.Option("--input-file", help="Prompts: .jsonl ({prompt}) or .txt.")] = None,
    output_file: Annotated[Optional[Path], typer.Option("--output-file", help="Results .jsonl (resumable).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per batch with --input-file.")] = 8,
    json_out: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    flags: Optional[dict] = None,
) -> None:
    """Generate text from a prompt (or a file of prompts) with a trained model."""
    cfg = _load(config, set_, print_config)
    if cfg is None:
        return
    from llmgen.generate.engine import Engine  # the library (torch, transformers): imported per command, so --help starts in a blink
    from llmgen.generate.files import generate_file, read_prompts

    p = cfg.generate.merged(**flags)
    if (input_file is None) == (prompt is None):
        raise LlmgenError("give either a PROMPT or --input-file FILE (with --output-file), not both or neither")
    if input_file is not None and output_file is None:
        raise LlmgenError("--input-file needs --output-file OUT.jsonl for the results")
    engine = Engine.load(model, cfg.run_dir, p.engine_options())
    rows = p.num_return_sequences  # decoded side by side (beam search decodes eagerly)
    if input_file is not None:
        n = len(read_prompts(input_file))
        engine.plan(-(-n * rows // batch_size) * p.max_new_tokens, f"{n} prompts")
    elif p.num_beams == 1:
        engine.plan(p.max_new_tokens, "one prompt")
    ui.info(f"model: {engine.source} ({engine.n_params / 1e6:.1f}M parameters; {engine.describe()})")
    if input_file is not None:
        new, old = generate_file(engine, input_file, output_file, p, batch_size, system)
        ui.info(f"wrote {new} results to {output_file}" + (f" ({old} were already there)" if old else ""))
        return
    templated = engine.format_for([prompt], p, system) is not None  # an instruction model: print only its reply
    if p.stream and not json_out and p.num_beams == 1 and p.num_return_sequences == 1:
        if not templated:
            typer.echo(prompt, nl=False)
        stream = engine.stream(prompt, p, system)
        for piece in stream:
            typer.echo(piece, nl=False)
        typer.echo()
        comps, st = [stream.completion], stream.stats
    else:
        result = engine.generate([prompt], p, system)
        comps, st = result[0], result.stats
        if not json_out:
            for i, c in enumerate(comps):
                if len(comps) > 1:
                    typer.echo(f"--- {i + 1}/{len(comps)}" + (f" (score {c.score:.3f})" if c.score is not None else ""))
                typer.echo(c.text if templated else prompt + c.text)
    if not templated and engine.tok.chat_template and not any(c.tokens for c in comps):
        # an imported instruction model given plain text (rendered as it is, as transformers' pipeline does) often
        # ends it at once: say where its chat template is used instead of leaving an empty answer unexplained
        ui.info("the model ended the text at once; it has a chat template (an instruction model?), which --system, "
                "`llmgen chat` and --input-file records with `messages` use; plain prompts are not wrapped in it")
    if json_out:
        typer.echo(json.dumps({"model": str(engine.source), "prompt": prompt, "prompt_tokens": st.prompt_tokens,
                               "completions": [{"text": c.text, "finish_reason": c.finish_reason, "new_tokens": len(c.tokens),
                                                **({"score": c.score} if c.score is not None else {})} for c in comps],
                               "engine": engine.describe(),
                               "seconds": round(st.prefill_s + st.decode_s, 4), "tokens_per_s": round(st.tokens_per_s, 1),
                               "prefill_seconds": round(st.prefill_s, 4), "decode_seconds": round(st.decode_s, 4),
                               "compile_seconds": round(st.compile_s, 4)},
                              ensure_ascii=False))
    else:
        compiled = f"; compiling the decode step took {st.compile_s:.1f}s more" if st.compile_s else ""
        # the prompt's pass apart from the decoding (as llama.cpp reports them): a long prompt's prefill otherwise
        # reads as a slow decode (6,000 prompt tokens, 16 new: "0.7 tokens/s")
        parts = (f": prompt {st.prompt_tokens:,} tokens in {st.prefill_s:.2f}s ({st.prompt_tokens / max(st.prefill_s, 1e-9):,.0f}"
                 f" tokens/s), decoding {st.new_tokens / max(st.decode_s, 1e-9):.1f} tokens/s") if st.prompt_tokens >= 64 else ""
        ui.info(f"{st.new_tokens} tokens in {st.prefill_s + st.decode_s:.2f}s ({st.tokens_per_s:.1f} tokens/s{compiled}){parts}")


@app.command()
@generate_flags
def chat(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt.")] = None,
    persona: Annotated[Optional[Path], typer.Option("--persona", help="A persona file (configs/personas/): its "
                                                    "system prompt and sampling defaults.")] = None,
    flags: Optional[dict] = None,
) -> None:
    """Multi-turn chat with a model that has a chat template (/reset, /save FILE, /exit)."""
    cfg = _load(config, set_, False)
    from llmgen.generate.chat import ChatSession, repl  # the library (torch, transformers): imported per command, so --help starts in a blink
    from llmgen.generate.engine import Engine

    gen = cfg.generate
    if persona is not None:  # the persona's defaults, under the flags given on the command line
        who = load_persona(persona)
        gen = gen.merged(**who.sampling)
        system = system or who.system
        ui.info(f"persona {who.name}: {who.description or who.system[:60]}")
    p = gen.merged(**flags)
    engine = Engine.load(model, cfg.run_dir, p.engine_options())
    engine.plan(engine.cfg.max_seq_len // 2, "a chat session", long=True)  # a session filling half its context
    ui.info(f"model: {engine.source} ({engine.n_params / 1e6:.1f}M parameters; {engine.describe()})")
    session = ChatSession(engine, p, system)
    if engine.compiling:
        ui.info("compiling the decode step for this session (the first time a minute or two; seconds from "
                "inductor's on-disk cache after that)")
        ui.info(f"compiled in {engine.warm_up(session=True):.1f}s")

    def read(prompt: str) -> str:
        return input(prompt) if sys.stdin.isatty() else _read_line(prompt)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    repl(session, read, write)


def _read_line(prompt: str) -> str:
    sys.stdout.write(prompt)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


@app.command()
def serve(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: ModelOpt = None,
    host: Annotated[Optional[str], typer.Option("--host", help="Address to bind (default 127.0.0.1: this machine only).")] = None,
    port: Annotated[Optional[int], typer.Option("--port", min=1, max=65535, help="Port (default 8000).")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' on /v1 "
                                                   "(or set LLMGEN_API_KEY).")] = None,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", min=1, help="Requests decoded together (default 16).")] = None,
    max_queue: Annotated[Optional[int], typer.Option("--max-queue", min=0, help="Waiting requests before 429 (default 64).")] = None,
    persona: Annotated[Optional[list[Path]], typer.Option("--persona", help="Persona file (repeatable): an extra model "
                                                          "id <model>/<name>.")] = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, with a web chat page at /."""
    cfg = _load(config, set_, False)
    sc = cfg.serve
    changes = {k: v for k, v in dict(host=host, port=port, max_batch=max_batch, max_queue=max_queue).items()
               if v is not None}
    sc = dataclasses.replace(sc, **changes, api_key=api_key or os.environ.get("LLMGEN_API_KEY") or sc.api_key,
                             personas=[str(x) for x in persona] if persona else sc.personas)
    personas = [load_persona(x) for x in sc.personas]
    if len({x.name for x in personas}) < len(personas):
        raise LlmgenError("two --persona files have the same name: give each persona its own name")
    try:
        import uvicorn

        from llmgen.serve.app import create_app  # per command, so --help starts in a blink
    except ImportError as e:
        raise LlmgenError(f"llmgen serve needs the serve extra ({e.name} is missing): pip install 'llmgen[serve]'") from None
    from llmgen.generate.engine import Engine

    if sc.host not in ("127.0.0.1", "localhost", "::1") and not sc.api_key:
        ui.info(f"warning: serving on {sc.host} without --api-key: anyone who can reach this address can use the model")
    engine = Engine.load(model, cfg.run_dir, cfg.generate.engine_options())
    name = Path(engine.source).parent.name if Path(engine.source).name == "final" else Path(engine.source).name
    application = create_app(engine, name, sc, cfg.generate, personas)
    if engine.compiling:
        ui.info("compiling the decode steps before serving (the first time a minute or two; seconds from "
                "inductor's on-disk cache after that)")
        ui.info(f"compiled in {application.state.server.warm_up():.1f}s")
    ids = ", ".join([name] + [f"{name}/{x.name}" for x in personas])
    ui.info(f"serving {engine.source} ({engine.describe()}) as {ids} on http://{sc.host}:{sc.port} "
            f"(web chat at /, OpenAI API at /v1; {sc.max_batch} requests at once); Ctrl-C or SIGTERM stops it")
    server = application.state.server
    web = uvicorn.Server(uvicorn.Config(application, host=sc.host, port=sc.port, log_level="warning",
                                        timeout_graceful_shutdown=30))

    def http() -> None:  # uvicorn in a thread of its own; the app's shutdown sets server.stop
        try:
            web.run()
        finally:
            server.stop.set()

    def on_signal(*_) -> None:  # SIGTERM/Ctrl-C: stop accepting, finish the requests in flight (up to 30 s);
        web.force_exit = web.should_exit  # a second one: at once
        web.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    thread = threading.Thread(target=http, name="llmgen-http", daemon=True)
    server.drive(thread.start)  # the decode loop stays in this thread, which loaded the model (Server.drive: why)
    thread.join()
    if not web.started:
        raise LlmgenError(f"could not serve on {sc.host}:{sc.port} (see above); pick another --port or --host")
    ui.info("server stopped")


@app.command("import")
def import_(
    source: Annotated[str, typer.Argument(help="HF model folder, hf:<hub id>, or a .gguf file.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Destination checkpoint folder (default: the import cache).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --output.")] = False,
) -> None:
    """Import a Hugging Face (Llama family, Qwen2, Mistral, GPT-2) or GGUF model as an llmgen checkpoint."""
    from llmgen.interop.hf import import_model  # the library (torch, transformers): imported per command, so --help starts in a blink

    folder = import_model(source, output, overwrite)
    ui.info(f"checkpoint ready: {folder} (use it with --model {folder} or finetune.base: {folder})")


@app.command()
def export(
    model: Annotated[Optional[str], typer.Argument(help="Run or checkpoint directory (default: the newest run).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Destination: a folder for hf (default "
                                                   "exported/), a .gguf file for gguf (default model.gguf).")] = None,
    format: Annotated[str, typer.Option("--format", help="hf (a transformers folder) or gguf (llama.cpp, ollama).")] = "hf",
    outtype: Annotated[Optional[str], typer.Option("--outtype", help="gguf weights: f32, f16 (default), bf16 "
                                                   "or q8_0.")] = None,
    persona: Annotated[Optional[Path], typer.Option("--persona", help="gguf: a persona file whose system prompt "
                                                    "and sampling go into the Modelfile.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Export a checkpoint (LoRA merged) as a transformers folder, or as GGUF with an ollama Modelfile."""
    if format not in ("hf", "gguf"):
        raise LlmgenError(f"--format {format!r} is not supported; use --format hf or --format gguf")
    cfg = load_config(config, [])
    if format == "gguf":
        from llmgen.interop.gguf_export import export_gguf  # per command, so --help starts in a blink

        if outtype is None:
            outtype = "f16"
            ui.info("writing f16 weights (the default; --outtype f32, bf16 or q8_0 for others)")
        path, mf = export_gguf(model, output or Path("model.gguf"), outtype, overwrite, cfg.run_dir,
                               load_persona(persona) if persona else None)
        ui.info(f"exported to {path} ({path.stat().st_size / 2 ** 20:.1f} MB, {outtype}) and {mf}: "
                f"llama-cli -m {path}, or ollama create mymodel -f {mf}")
        return
    if persona is not None or outtype is not None:
        raise LlmgenError(f"--{'persona' if persona is not None else 'outtype'} goes with --format gguf; hf folders "
                          f"keep the checkpoint's full precision and take no persona")
    from llmgen.interop.export import export_hf  # the library (torch, transformers): imported per command

    folder = export_hf(model, output or Path("exported"), overwrite, cfg.run_dir)
    ui.info(f"exported to {folder}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r})")


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\n")).strip()


def _click_errors(name: str) -> tuple[type, ...]:
    """click's exception class `name` and, from typer 0.24 on (which ships its own copy of click),
    typer's: usage errors raised by either must map to their exit codes, not to 'internal error'."""
    classes = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored  # only in typer >= 0.24
    except ImportError:
        vendored = None
    if vendored is not None and hasattr(vendored, name):
        classes.append(getattr(vendored, name))
    return tuple(classes)


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: maps errors to exit codes."""
    try:
        app(args=argv, prog_name="llmgen", standalone_mode=False)
    except LlmgenError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except (*_click_errors("Exit"), typer.Exit) as e:
        sys.exit(e.exit_code)
    except _click_errors("ClickException") as e:
        e.show()
        sys.exit(e.exit_code)
    except (*_click_errors("Abort"), typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        full = disk_full_error(e, Path(getattr(e, "filename", None) or "."))  # a full disk anywhere is not a bug
        if full is not None:
            print(f"error: {_one_line(full)}", file=sys.stderr)
            sys.exit(2)
        if _state["debug"]:
            traceback.print_exc()
        else:
            print(f"internal error: {type(e).__name__}: {_one_line(e)[:300]} (this is a bug in llmgen; rerun with "
                  f"--debug for the traceback and report it)", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
