"""The experiment config: one typed dataclass per YAML section, strict loading and overrides.

A config is built in three layers: the embedded defaults (the offline quickstart), then the
YAML file given with `--config`, then each `--set section.key=value`. Every key is checked
against the schema below; unknown keys, wrong types and out-of-range values raise
`LlmgenError` with the file, the key and a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from llmgen import ui
from llmgen.atomic import atomic_write_text
from llmgen.errors import LlmgenError


def _rng(lo: float | None = None, hi: float | None = None, gt: float | None = None) -> dict:
    """Field metadata for numeric bounds: lo <= v <= hi, and v > gt."""
    return {"lo": lo, "hi": hi, "gt": gt}


@dataclass
class DataConfig:
    # A path (.txt/.jsonl/.json/.parquet/.csv, folder or glob), hf:<name>[:<config>], or builtin:stories.
    source: Union[str, list[str]] = "builtin:stories"
    prepared_dir: str = "data/quickstart"
    val_fraction: float = field(default=0.05, metadata=_rng(0.0, 0.5))
    text_field: str = "text"
    # How a .txt file is cut into documents: null = one document per file; e.g. "\n\n" or "<|endoftext|>".
    separator: Optional[str] = None
    streaming: bool = False  # hf: sources: stream instead of downloading the whole dataset
    split: str = "train"  # hf: sources: which split to read
    on_decode_error: Literal["error", "replace"] = "error"
    max_documents: Optional[int] = field(default=None, metadata=_rng(1))
    builtin_documents: int = field(default=12000, metadata=_rng(1))  # size of builtin: corpora
    seed: int = 1337  # builtin: generator and the train/val split


@dataclass
class TokenizerConfig:
    type: Literal["bpe", "bytes", "pretrained"] = "bpe"
    vocab_size: int = field(default=1024, metadata=_rng(1, 1 << 24))
    path: Optional[str] = None  # tokenizer.json or an HF tokenizer directory, for type: pretrained
    min_frequency: int = field(default=2, metadata=_rng(1))
    train_max_bytes: int = field(default=200_000_000, metadata=_rng(1))  # BPE trains on this much text


# Named model shapes; explicit model.* keys override the preset's values.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(arch="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=128, max_seq_len=256),
    "quickstart": dict(arch="llama", n_layer=4, n_head=4, n_kv_head=4, d_model=128, max_seq_len=256),
    "small": dict(arch="llama", n_layer=6, n_head=6, n_kv_head=6, d_model=384, max_seq_len=512),
    "gpt2-124m": dict(arch="gpt2", n_layer=12, n_head=12, n_kv_head=12, d_model=768, max_seq_len=1024,
                      tie_embeddings=True),
    "llama-110m": dict(arch="llama", n_layer=12, n_head=12, n_kv_head=4, d_model=768, max_seq_len=1024),
}


@dataclass
class ModelConfig:
    preset: Optional[str] = "quickstart"
    arch: Literal["llama", "gpt2"] = "llama"
    n_layer: int = field(default=4, metadata=_rng(1))
    n_head: int = field(default=4, metadata=_rng(1))
    n_kv_head: Optional[int] = field(default=None, metadata=_rng(1))  # null = n_head (no GQA)
    d_model: int = field(default=128, metadata=_rng(1))
    d_ff: Optional[int] = field(default=None, metadata=_rng(1))  # null = arch default
    max_seq_len: int = field(default=256, metadata=_rng(1))
    vocab_size: Optional[int] = field(default=None, metadata=_rng(1))  # null = from the tokenizer
    dropout: float = field(default=0.0, metadata=_rng(0.0, 1.0))
    tie_embeddings: bool = True
    rope_theta: float = field(default=10000.0, metadata=_rng(gt=0))
    norm_eps: float = field(default=1e-5, metadata=_rng(gt=0))
    qkv_bias: bool = False  # biases on the q/k/v projections of llama-style models (Qwen2)
    rope_scaling_factor: float = field(default=1.0, metadata=_rng(gt=0))  # linear RoPE position scaling

    # Derived shape and the variant's parts, chosen here once by `arch` (architecture as data):
    # the network reads these instead of testing the arch name.
    @property
    def n_kv(self) -> int:
        """KV heads: n_kv_head, or n_head when unset (no grouped-query attention)."""
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_hidden(self) -> int:
        """MLP width: d_ff, else 4*C (gpt2) or ~8/3*C rounded up to a multiple of 64 (llama's SwiGLU)."""
        if self.d_ff:
            return self.d_ff
        return 4 * self.d_model if self.arch == "gpt2" else 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def norm(self) -> str:
        return "layernorm" if self.arch == "gpt2" else "rmsnorm"

    @property
    def mlp(self) -> str:
        return "gelu" if self.arch == "gpt2" else "swiglu"

    @property
    def positions(self) -> str:
        """learned absolute position embeddings (gpt2) or rotary embeddings in attention (llama)."""
        return "learned" if self.arch == "gpt2" else "rope"

    @property
    def bias(self) -> bool:
        """Biases on every linear layer but the head (gpt2); llama has none (q/k/v: see qkv_bias)."""
        return self.arch == "gpt2"


@dataclass
class TrainConfig:
    max_steps: int = field(default=400, metadata=_rng(1))
    batch_size: int = field(default=16, metadata=_rng(1))
    grad_accum_steps: int = field(default=1, metadata=_rng(1))
    seq_len: int = field(default=128, metadata=_rng(1))
    lr: float = field(default=2e-3, metadata=_rng(gt=0))
    min_lr: float = field(default=2e-4, metadata=_rng(0.0))
    warmup_steps: int = field(default=50, metadata=_rng(0))
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    weight_decay: float = field(default=0.1, metadata=_rng(0.0))
    beta1: float = field(default=0.9, metadata=_rng(0.0, 1.0))
    beta2: float = field(default=0.95, metadata=_rng(0.0, 1.0))
    grad_clip: float = field(default=1.0, metadata=_rng(0.0))
    eval_every: int = field(default=100, metadata=_rng(1))
    eval_steps: int = field(default=20, metadata=_rng(1))
    log_every: int = field(default=10, metadata=_rng(1))
    save_every: int = field(default=200, metadata=_rng(1))
    keep: Literal["last", "best"] = "best"
    keep_last_n: int = field(default=2, metadata=_rng(1))
    seed: int = 1337
    mixed_precision: Literal["auto", "no", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    # CPU training, not compiled: llmgen's fused RMSNorm/RoPE/attention/SwiGLU/GELU kernels (kernels/training.py; built once
    # per machine, ~25 s). false = torch's own ops
    kernels: bool = True
    # multi-process strategy under torchrun / accelerate launch: ddp replicates the model on every
    # rank; fsdp shards parameters, gradients and optimizer state per transformer block (FSDP2)
    distributed: Literal["ddp", "fsdp"] = "ddp"
    early_stopping_patience: Optional[int] = field(default=None, metadata=_rng(1))
    resume: Literal["never", "auto"] = "never"
    skip_nonfinite: bool = False


@dataclass
class LoraConfig:
    r: int = field(default=8, metadata=_rng(1))
    alpha: float = field(default=16.0, metadata=_rng(gt=0))
    dropout: float = field(default=0.05, metadata=_rng(0.0, 1.0))
    target_modules: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class DatasetSpec:
    source: str = "builtin:instructions"
    format: Literal["text", "alpaca", "chat", "prompt_completion"] = "prompt_completion"
    weight: float = field(default=1.0, metadata=_rng(gt=0))


@dataclass
class FinetuneConfig:
    base: Optional[str] = None  # null = the newest pretrained run under run_dir
    run_dir: Optional[str] = None  # where the finetune run goes; null = <run_dir>/finetune
    method: Literal["full", "lora", "freeze"] = "full"
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze_layers: Optional[int] = field(default=None, metadata=_rng(0))  # freeze the bottom N blocks
    trainable_layers: Optional[int] = field(default=None, metadata=_rng(0))  # or: train only the top N blocks
    trainable_parts: list[str] = field(default_factory=list)  # also train these (norm, lm_head, tok_emb)
    layer_lr_decay: float = field(default=1.0, metadata=_rng(gt=0, hi=1.0))
    datasets: list[DatasetSpec] = field(default_factory=lambda: [DatasetSpec()])
    template: Optional[Literal["alpaca", "chatml", "plain"]] = None
    train_on_prompt: bool = False
    packing: bool = True
    val_fraction: float = field(default=0.05, metadata=_rng(0.0, 0.5))
    val_examples: Optional[int] = field(default=None, metadata=_rng(0))  # hold out exactly N per dataset instead
    max_examples: Optional[int] = field(default=None, metadata=_rng(1))  # per dataset
    # after training, generate for the held-out examples and score them (e.g. [rouge, bleu]); they are
    # also written to <finetune run>/heldout.jsonl, so `llmgen eval --data` can score the base on them
    eval_metrics: list[str] = field(default_factory=list)
    # Finetuning defaults differ from pretraining; null = derive from train.* (lr: a fraction of it)
    lr: Optional[float] = field(default=None, metadata=_rng(gt=0))
    max_steps: int = field(default=150, metadata=_rng(1))
    warmup_steps: int = field(default=15, metadata=_rng(0))
    batch_size: Optional[int] = field(default=None, metadata=_rng(1))
    seq_len: Optional[int] = field(default=None, metadata=_rng(1))  # null = the model context, at most 512
    eval_every: int = field(default=50, metadata=_rng(1))
    dropout: Optional[float] = field(default=None, metadata=_rng(0.0, 1.0))
    merge: bool = False  # LoRA: also write a merged full checkpoint to <finetune run>/merged


def _flag(help: str, short: Optional[str] = None, **bounds) -> dict:
    """Field metadata for a generate.* key: its --flag's help (and short name), and numeric bounds."""
    return {**_rng(**bounds), "help": help, "short": short}


@dataclass
class SamplingParams:
    """How the engine picks tokens and when it stops: everything one generation request may set.
    Each field is also a `llmgen generate`/`chat` flag (--max-new-tokens ...), built from this class."""

    max_new_tokens: int = field(default=100, metadata=_flag("Tokens to generate.", "-n", lo=1))
    temperature: float = field(default=0.8, metadata=_flag("0 = greedy.", "-t", lo=0.0))
    top_k: Optional[int] = field(default=None, metadata=_flag("Sample from the k most likely tokens.", lo=1))
    top_p: float = field(default=1.0, metadata=_flag("Nucleus sampling mass in (0, 1].", gt=0.0, hi=1.0))
    min_p: float = field(default=0.0, metadata=_flag("Drop tokens below min_p x the top probability.", lo=0.0, hi=1.0))
    repetition_penalty: float = field(default=1.0, metadata=_flag("CTRL penalty (>1 discourages repeats).", gt=0))
    presence_penalty: float = field(default=0.0, metadata=_flag("Subtract this from every seen token's logit."))
    frequency_penalty: float = field(default=0.0, metadata=_flag("Subtract this x each token's count so far."))
    no_repeat_ngram_size: int = field(default=0, metadata=_flag("Never repeat an n-gram of this size.", lo=0))
    num_beams: int = field(default=1, metadata=_flag("Beam search width (1 = off).", lo=1))
    length_penalty: float = field(default=1.0, metadata=_flag("Beam scores / length^this."))
    early_stopping: bool = field(default=True, metadata=_flag("Beam search ends when num_beams hypotheses end."))
    num_return_sequences: int = field(default=1, metadata=_flag("Completions per prompt.", lo=1))
    seed: Optional[int] = field(default=None, metadata=_flag("Seed for reproducible sampling."))
    stop: list[str] = field(default_factory=list, metadata=_flag("Stop string (repeatable)."))
    ignore_eos: bool = field(default=False, metadata=_flag("Keep going past the end-of-text token (benchmarks)."))
    # left-truncate prompts longer than the context instead of refusing
    truncate_prompt: bool = field(default=False, metadata=_flag("Keep the end of over-long prompts."))
    raw: bool = field(default=False, metadata=_flag("Do not apply the finetuned prompt template."))


@dataclass
class EngineOptions:
    """How the engine is built (once per model), as opposed to how each request samples."""

    device: Optional[str] = None  # null = cuda when available, else cpu
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: measured (kernels.precision)
    # decoding weights: auto (null) = fp16 through FBGEMM where measured faster (fp32 models on x86 CPUs), else
    # the model's own; none = the model's own; fp16; int8 / int4 weight blocks (kernels/blockwise.py on AVX2 CPUs;
    # int8 elsewhere: torch's weight-only int8)
    quantize: Optional[Literal["auto", "none", "fp16", "int8", "int4"]] = None
    # torch.compile the decode step: True, False, or None = auto: where it pays for the work ahead on this
    # machine (Engine.plan, generate/compile_plan.py). The first call of a graph pays its compile time.
    compile: Optional[bool] = None
    # what the engine is for: decode (generate, chat, serve, predictions: dtype auto is measured on one-row
    # products, bound by reading the weights) or score (perplexity batches only: measured on full products)
    work: Literal["decode", "score"] = "decode"


@dataclass
class GenerateConfig(SamplingParams):
    """The generate: section: sampling parameters, how the CLI prints, and the engine's options."""

    stream: bool = field(default=True, metadata=_flag("Print tokens as they come."))
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto", metadata=_flag("Weights and activations: auto = bf16 where this machine runs it clearly "
                                       "faster than fp32 (measured), else fp32."))
    quantize: Optional[Literal["auto", "none", "fp16", "int8", "int4"]] = field(default=None, metadata=_flag(
        "Decoding weights: auto (default) = fp16 where this CPU runs them clearly faster than fp32 (measured), "
        "none = the model's own, fp16, int8 or int4 (blocks of 32 weights with their own scale; int4 keeps the "
        "output head in int8)."))
    compile: Optional[bool] = field(default=None, metadata=_flag(
        "torch.compile the decode step. Default (null): where it pays on this machine for the work asked (long "
        "generations, files of prompts, chat sessions; not one short answer), from timings it records."))

    def engine_options(self, device: Optional[str] = None) -> EngineOptions:
        return EngineOptions(device=device, dtype=self.dtype, quantize=self.quantize, compile=self.compile)

    def merged(self, **overrides) -> "GenerateConfig":
        """These settings with the given non-None values replaced (CLI flags over the config), re-validated."""
        values = dataclasses.asdict(self)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return to_dataclass(GenerateConfig, values, "command line", "generate.")


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: ["ppl", "bleu", "rouge"])
    data: Optional[str] = None
    max_samples: Optional[int] = field(default=None, metadata=_rng(1))
    stride: Optional[int] = field(default=None, metadata=_rng(1))
    window: Optional[int] = field(default=None, metadata=_rng(2))  # ppl window in tokens (null: the context, <= 8192)
    batch_size: int = field(default=8, metadata=_rng(1))
    seed: int = 1337
    aggregation: Literal["mean", "bootstrap"] = "mean"  # how ROUGE is averaged over examples
    sample: bool = False  # sample predictions with the generate settings (default: greedy)


@dataclass
class ServeConfig:
    """The serve: section (`llmgen serve` flags override it)."""

    host: str = "127.0.0.1"  # another address exposes the server beyond this machine: set api_key
    port: int = field(default=8000, metadata=_rng(1, 65535))
    api_key: Optional[str] = None  # or LLMGEN_API_KEY; required as "Authorization: Bearer KEY" on /v1
    max_batch: int = field(default=16, metadata=_rng(1, 256))  # requests decoded together (KV-cache rows)
    max_queue: int = field(default=64, metadata=_rng(0))  # waiting requests beyond that get 429
    max_len: Optional[int] = field(default=None, metadata=_rng(2))  # cache slots per request (null: min(context, 4096))
    max_body_kb: int = field(default=1024, metadata=_rng(1))  # larger request bodies get 413
    # prompts' KV entries kept after their prefill, up to this many MB (0: off): a prompt that starts as a
    # kept one does (a system message, a persona, the conversation so far) copies them instead of computing
    prefix_cache_mb: int = field(default=256, metadata=_rng(0))
    personas: list[str] = field(default_factory=list)  # persona files: extra model ids <model>/<name>


@dataclass
class Config:
    run_dir: str = "runs/quickstart"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    # the dotted keys the YAML file and --set named (not the defaults); set by build_config
    explicit: frozenset[str] = field(default=frozenset(), repr=False, compare=False, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "explicit"}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


@dataclass
class Persona:
    """A role a model plays for an application (configs/personas/*.yaml): a name, a system prompt and
    the sampling settings it defaults to (`chat --persona`, the server's `<model>/<name>` ids, the
    SYSTEM and PARAMETER lines of an exported ollama Modelfile)."""

    name: str
    system: str
    description: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields it sets


def load_persona(path: str | Path) -> Persona:
    """Read and check a persona file; one clear line for anything wrong in it."""
    path = Path(path)
    raw = _read_yaml(path)
    where = str(path)
    for key in ("name", "system"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise LlmgenError(f"{where}: a persona needs a non-empty {key}: (text), e.g. {key}: "
                              + ("support" if key == "name" else "'You are a helpful support agent.'"))
    unknown = set(raw) - {"name", "system", "description", "sampling"}
    if unknown:
        raise LlmgenError(f"{where}: unknown key {sorted(unknown)[0]}; a persona has name, system, description, "
                          f"sampling")
    sampling = raw.get("sampling") or {}
    checked = to_dataclass(SamplingParams, sampling, where, "sampling.")  # types and ranges, as generate: has
    return Persona(name=raw["name"].strip(), system=raw["system"].strip(), description=str(raw.get("description") or ""),
                   sampling={k: getattr(checked, k) for k in sampling})


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `section.key=value` overrides, validated against the schema."""
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        raw = _read_yaml(Path(path))
        where = str(path)
    for item in overrides or []:
        _apply_override(raw, item)
    return build_config(raw, where)


def build_config(raw: dict[str, Any], where: str = "config") -> Config:
    """Validate a nested dict (as read from YAML) into a Config."""
    raw = dict(raw)
    model = raw.get("model")
    from_preset: dict[str, Any] = {}  # model keys the preset supplies (the user did not set them)
    if model is None or isinstance(model, dict):
        model = dict(model or {})
        preset = model.get("preset", ModelConfig.preset)
        if preset is not None:
            if preset not in MODEL_PRESETS:
                raise LlmgenError(f"{where}: model.preset {preset!r} is unknown{suggest(str(preset), MODEL_PRESETS)}; "
                                  f"choose one of {', '.join(MODEL_PRESETS)} or set preset: null and the shape keys")
            from_preset = {k: v for k, v in MODEL_PRESETS[preset].items() if k not in model}
            if "n_head" in model:  # a KV-head count only means something with the head count it was set for
                from_preset.pop("n_kv_head", None)
            model = {**from_preset, **model}
        raw["model"] = model
    given = _dotted_keys({k: v for k, v in raw.items() if k != "model"})
    given |= {f"model.{k}" for k in raw.get("model", {}) if k not in from_preset} if isinstance(raw.get("model"), dict) else set()
    cfg = to_dataclass(Config, raw, where, prefix="")
    _check_consistency(cfg, where, {k: cfg.model.preset for k in from_preset})
    return dataclasses.replace(cfg, explicit=frozenset(given))


def _dotted_keys(raw: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for k, v in raw.items():
        out |= _dotted_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def _check_consistency(cfg: Config, where: str, preset_keys: Optional[dict[str, str]] = None) -> None:
    m = cfg.model

    def origin(key: str) -> str:  # where a model value came from, when the user did not write it
        name = (preset_keys or {}).get(key)
        return f" (from model.preset {name}: set model.{key} to change it)" if name else ""

    if m.d_model % m.n_head:
        raise LlmgenError(f"{where}: model.d_model ({m.d_model}{origin('d_model')}) must be divisible by model.n_head "
                          f"({m.n_head}{origin('n_head')})")
    if m.n_head % m.n_kv:
        raise LlmgenError(f"{where}: model.n_head ({m.n_head}{origin('n_head')}) must be a multiple of "
                          f"model.n_kv_head ({m.n_kv}{origin('n_kv_head')})")
    if cfg.train.min_lr > cfg.train.lr:
        raise LlmgenError(f"{where}: train.min_lr ({cfg.train.min_lr}) is larger than train.lr ({cfg.train.lr})")


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise LlmgenError(f"config file {path} is a folder; pass a YAML file to --config (examples are in configs/)")
    if path.is_symlink() and not path.exists():
        raise LlmgenError(f"config file {path} is a symbolic link to a file that does not exist (or a link "
                          f"cycle); point --config at the YAML file itself")
    if not path.is_file():
        raise LlmgenError(f"config file {path} does not exist; pass an existing YAML file to --config "
                          f"(examples are in configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LlmgenError(f"{path}:{line}: malformed YAML: {e.problem or e.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise LlmgenError(f"{path}: cannot be read as YAML: {e}") from None
    if data is None:
        ui.info(f"{path} is empty: running on the embedded quickstart defaults")
        return {}
    if not isinstance(data, dict):
        raise LlmgenError(f"{path}: the top level must be a mapping of sections (data:, model:, train: ...), "
                          f"got {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise LlmgenError(f"--set {item!r}: expected section.key=value, e.g. --set train.max_steps=100")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text  # not YAML: take it as a plain string
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def to_dataclass(cls: type, raw: Any, where: str, prefix: str) -> Any:
    section = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise LlmgenError(f"{where}: {section} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise LlmgenError(f"{where}: unknown key {prefix}{key}{suggest(str(key), fields)}; "
                              f"valid keys in {section}: {', '.join(fields)}")
        f = fields[key]
        kwargs[key] = _coerce(hints[key], value, where, prefix + key, f.metadata)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


class _Mismatch(Exception):
    pass


def _coerce(tp: Any, value: Any, where: str, key: str, meta: Any = None) -> Any:
    try:
        out = _coerce_inner(tp, value, where, key)
    except _Mismatch:
        raise LlmgenError(f"{where}: {key} = {value!r} is not {_type_name(tp)}") from None
    if isinstance(out, float) and not math.isfinite(out):  # .nan / .inf mean nothing for any key
        raise LlmgenError(f"{where}: {key} = {value!r} is not a finite number; allowed: {_allowed(meta)}")
    if meta and isinstance(out, (int, float)) and not isinstance(out, bool):
        lo, hi, gt = meta.get("lo"), meta.get("hi"), meta.get("gt")
        bad = (lo is not None and out < lo) or (hi is not None and out > hi) or (gt is not None and out <= gt)
        if bad:
            raise LlmgenError(f"{where}: {key} = {value!r} is out of range; allowed: {_allowed(meta)}")
    return out


def _allowed(meta: Any) -> str:
    """The allowed range of a numeric key, in words."""
    meta = meta or {}
    parts = [f"{op} {meta[k]}" for k, op in (("gt", ">"), ("lo", ">="), ("hi", "<=")) if meta.get(k) is not None]
    return " and ".join(parts) if parts else "any finite number"


def _coerce_inner(tp: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce_inner(arg, value, where, key)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise LlmgenError(f"{where}: {key} = {value!r} is not one of {', '.join(map(repr, choices))}"
                              f"{suggest(str(value), [str(c) for c in choices])}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            if isinstance(value, (str, int, float)) and not dataclasses.is_dataclass(item_tp):
                value = [value]  # a lone scalar is a one-item list
            else:
                raise _Mismatch
        return [_coerce(item_tp, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return to_dataclass(tp, value, where, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    raise _Mismatch


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, cfg.to_yaml())
