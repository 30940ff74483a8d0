"""Which floating-point precision this machine runs fastest, measured, not assumed.

The project's machines change kind: on an Intel Xeon with AMX a bf16 matmul runs 5-8x fp32, on an
AMD EPYC without fast bf16 it runs far slower than fp32. `choose_dtype` times one matmul in each
precision on the device (once per process, a few milliseconds) and picks bf16 only where it is clearly
faster; CUDA uses bf16 where the GPU supports it and fp16 otherwise.
"""

from __future__ import annotations

import functools
import platform
import time
from pathlib import Path

import torch

NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WORTH = 1.5  # a lower precision must be at least this much faster than fp32 to be used by default


@functools.lru_cache(maxsize=None)
def matmul_speedup(device_type: str, dtype: torch.dtype) -> float:
    """How many times faster a matmul runs in `dtype` than in fp32 on this device: 256 x 256 first (a few
    milliseconds), then, where `dtype` is faster there, 512 x 512 (~20 ms), which measures the speed-up
    steadily (on an AMD EPYC Zen 4 with avx512_bf16: 1.6-1.9x at 256 from one run to the next, 2.0-2.4x
    at 512, 2.3-2.6x at 1024+)."""
    quick = _speedup_at(device_type, dtype, 256)
    return quick if quick < 1 else _speedup_at(device_type, dtype, 512)


def _speedup_at(device_type: str, dtype: torch.dtype, n: int) -> float:
    """How many times faster an n x n matmul runs in `dtype` than in fp32 (the best of alternating rounds,
    so a noisy neighbour slows both alike; stops early when `dtype` is clearly slower, so a CPU without
    fast bf16 pays a few milliseconds, not seconds)."""
    device = torch.device(device_type)
    best = {torch.float32: float("inf"), dtype: float("inf")}
    mats = {d: (torch.ones(n, n, device=device, dtype=d), torch.ones(n, n, device=device, dtype=d)) for d in best}
    with torch.no_grad():
        for round_ in range(6):
            if round_ >= 2 and best[dtype] > 2 * best[torch.float32]:
                break
            for d, (a, b) in mats.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                a @ b
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best[d] = min(best[d], time.perf_counter() - t0)
    return best[torch.float32] / max(best[dtype], 1e-9)


def choose_dtype(device: torch.device, setting: str = "auto") -> tuple[torch.dtype, str]:
    """(dtype, why) for `setting` (auto | fp32 | bf16 | fp16) on `device`."""
    if setting != "auto":
        return NAMES[setting], "as asked"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA with bf16 support"
        return torch.float16, "CUDA without bf16"
    if device.type != "cpu":
        return torch.float32, f"{device.type} device"
    speedup = matmul_speedup("cpu", torch.bfloat16)
    why = f"bf16 matmul {speedup:.2f}x fp32 on this CPU"
    return (torch.bfloat16, why) if speedup >= WORTH else (torch.float32, why)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in NAMES.items()}[dtype]


def cpu_name() -> str:
    """The CPU's model name, with its family/model numbers and the vector extensions that decide its fast paths
    where the name alone does not tell (VMs report "AMD EPYC" for Zen 3 and Zen 4 alike): timings depend on it.
    Elsewhere the architecture."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                    if ":" in line)
    except OSError:
        info = {}
    info = {k.strip(): v.strip() for k, v in info.items()}
    if "model name" not in info:
        return platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    ext = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags] or [f for f in ("avx2",) if f in flags]
    return f"{info['model name']} (family {info.get('cpu family', '?')} model {info.get('model', '?')}; {' '.join(ext) or 'no AVX2'})"
