"""The `llmgen` command: parse arguments, load the config, call one library function, print.

Exit codes: 0 success, 2 a user error (one line on stderr: what, where, how to fix),
1 a bug (the traceback is shown with `--debug`).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from llmgen import __version__
from llmgen.config import Config, load_config
from llmgen.errors import LlmgenError

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
    from llmgen import ui

    _state["debug"] = debug
    ui.set_verbosity(debug)


def _load(config: Optional[Path], overrides: Optional[list[str]], print_config: bool) -> Optional[Config]:
    cfg = load_config(config, overrides or [])
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return None
    return cfg


def _not_yet(command: str, issue: str) -> None:
    raise LlmgenError(f"`llmgen {command}` is not available yet in llmgen {__version__} (it lands with the "
                      f"{issue}); see the README for what works today")


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
    from llmgen import ui
    from llmgen.data.prepare import prepare as run_prepare

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
    from llmgen import ui
    from llmgen.train.pretrain import pretrain as run_pretrain

    res = run_pretrain(cfg, resume=resume, overwrite=overwrite)
    if res.interrupted:
        return
    best = f", best val loss {res.best_val_loss:.4f}" if res.best_val_loss is not None else ""
    ui.info(f"done: {res.step} steps{best}; model in {res.final_dir} (metrics.jsonl and loss.png in {res.run_dir})")


@app.command()
def finetune(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_config: PrintOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest complete checkpoint.")] = False,
) -> None:
    """Finetune a pretrained or imported model (full, LoRA or freeze) on instructions or text."""
    if _load(config, set_, print_config) is None:
        return
    _not_yet("finetune", "finetune issue")


def _eval(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_config: PrintOpt = False,
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Run or checkpoint directory (repeat to compare).")] = None,
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="Comma-separated: ppl,bleu,rouge,chrf.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Evaluation data (text for ppl, jsonl for bleu/rouge).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write results as JSON.")] = None,
) -> None:
    """Evaluate models: perplexity, BLEU, ROUGE."""
    if _load(config, set_, print_config) is None:
        return
    _not_yet("eval", "eval issue")


app.command("eval")(_eval)
app.command("evaluate", help="Alias of `llmgen eval`.")(_eval)


@app.command()
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="Prompt text.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    print_config: PrintOpt = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Run or checkpoint directory.")] = None,
) -> None:
    """Generate text from a prompt with a trained model."""
    if _load(config, set_, print_config) is None:
        return
    _not_yet("generate", "generate issue")


@app.command()
def chat(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Run or checkpoint directory.")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt (persona).")] = None,
) -> None:
    """Multi-turn chat with a model that has a chat template."""
    _not_yet("chat", "generate issue")


@app.command("import")
def import_(
    source: Annotated[str, typer.Argument(help="HF model folder, hf:<hub id>, or a .gguf file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Destination checkpoint folder.")],
) -> None:
    """Import a Hugging Face or GGUF model as an llmgen checkpoint."""
    _not_yet("import", "import/export issue")


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Run or checkpoint directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Destination folder.")],
    format: Annotated[str, typer.Option("--format", help="Output format: hf.")] = "hf",
) -> None:
    """Export a checkpoint to Hugging Face transformers format."""
    _not_yet("export", "import/export issue")


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\n")).strip()


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point: maps errors to exit codes."""
    try:
        app(args=argv, prog_name="llmgen", standalone_mode=False)
    except LlmgenError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if _state["debug"]:
            traceback.print_exc()
        else:
            print(f"internal error: {type(e).__name__}: {_one_line(e)[:300]} (this is a bug in llmgen; rerun with "
                  f"--debug for the traceback and report it)", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
