"""Devices and processes: the Accelerator, FSDP2 sharding, gathering full state for checkpoints, and
the measured hardware numbers the loop logs (matmul peak for MFU, peak memory).

The loop runs unchanged on one CPU, one GPU, or several processes under torchrun / accelerate launch:
DDP replicates the model on every rank; FSDP shards parameters, gradients and optimizer state per
transformer block.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import save_file
from accelerate.utils import FullyShardedDataParallelPlugin

from llmgen.config import TrainConfig
from llmgen.kernels.precision import choose_dtype


def mixed_precision_mode(setting: str) -> tuple[str, str]:
    """accelerate's mixed_precision value for `train.mixed_precision`, and why. `auto` measures: bf16
    autocast where bf16 matmuls are clearly faster than fp32 on this device (see kernels.precision)."""
    if setting != "auto":
        return ("no" if setting == "fp32" else setting), "as configured"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype, why = choose_dtype(device)
    return {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype], why


def make_accelerator(t: TrainConfig) -> tuple[Accelerator, str]:
    """The Accelerator for this run, and why it uses the precision it does."""
    # cpu=True on a CPU-only machine makes accelerate run torchrun/accelerate-launch processes as gloo DDP
    fsdp = None
    if t.distributed == "fsdp":  # each transformer block one shard unit; full state dicts for checkpoints
        fsdp = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                              transformer_cls_names_to_wrap=["Block"], reshard_after_forward=True,
                                              state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)
    mode, why = mixed_precision_mode(t.mixed_precision)
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mode:
        # a second run in this process (the Python API, tests) with another precision: accelerate keeps
        # one global state and refuses to change it; drop it, keeping the process group
        AcceleratorState._reset_state(reset_partial_state=False)
    if torch.cuda.is_available():  # what stays fp32 under autocast (norms, the loss) may use TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mode,
                      gradient_accumulation_steps=t.grad_accum_steps, fsdp_plugin=fsdp)
    return acc, why


def gather_full_state(acc: Accelerator, model, optimizer) -> tuple[dict, dict]:
    """FSDP: the full weights (keys as in the unwrapped network) and optimizer state, on the main rank
    (a collective: every rank calls it)."""
    weights = acc.get_state_dict(model)
    weights = {k.removeprefix("model."): v for k, v in weights.items()}  # the loss wrapper's prefix
    # FSDP only, so imported here: torch.distributed.checkpoint takes ~1 s to import on a small CPU
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opt = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return weights, opt


def load_optimizer_state(model, optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def full_weights_saver(weights: dict[str, torch.Tensor]) -> Callable:
    """A save_weights hook writing an already gathered state dict (tied weights stored once)."""
    def save(folder: Path, model: torch.nn.Module) -> None:
        sd = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        if getattr(model.cfg, "tie_embeddings", False):
            sd.pop("tok_emb.weight", None)  # as safetensors.save_model stores tied weights
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})

    return save


def check_ranks_in_sync(acc: Accelerator, model: torch.nn.Module) -> Optional[float]:
    """DDP invariant: every rank holds the same weights; returns the common checksum."""
    checksum = torch.stack([p.detach().float().sum() for p in model.parameters()]).sum().reshape(1)
    sums = acc.gather(checksum.to(acc.device))
    if not torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-6):
        raise RuntimeError(f"ranks diverged: weight checksums {sums.tolist()}")
    return sums[0].item()


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Measured dense matmul FLOP/s on this device in the precision the run computes in, for MFU
    (at most ~0.2 s: a precision the device runs slowly is timed with fewer, smaller products)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    n = 4096 if device.type == "cuda" else 1024  # a GPU needs big products to reach its peak
    a = torch.ones(n, n, device=device, dtype=dtype)  # values do not matter; keep the RNG untouched
    b = torch.ones(n, n, device=device, dtype=dtype)
    a @ b
    sync()
    t0 = time.perf_counter()
    a @ b
    sync()
    once = time.perf_counter() - t0
    reps = max(1, min(50 if device.type == "cuda" else 10, int(0.2 / max(once, 1e-9))))
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated on the device; CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
