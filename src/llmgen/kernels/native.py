"""Building llmgen's own C++ kernels (blockwise.cpp, training.cpp) for the machine they run on.

A source is compiled with the machine's C++ compiler through `torch.utils.cpp_extension` the first time
it is needed (~10-20 s) into `~/.cache/llmgen/kernels/<name>-<hash of source and torch version>`, and
registers torch operators when loaded; later runs load the library directly. A build runs in a folder of
its own renamed into place when done, so a build stopped half-way (Ctrl-C, kill -9) leaves no lock or
half-written library for the next run to trip on.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from llmgen.errors import LlmgenError

FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]


def missing(what: str) -> Optional[str]:
    """Why `what` cannot run here (None where it can): it needs an x86 CPU with AVX2 and a C++ compiler."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"this CPU's vector unit is {torch.backends.cpu.get_cpu_capability()} ({what} need AVX2)"
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        return f"no C++ compiler to build {what} (install g++, e.g. apt-get install g++)"
    return None


def library_dir(source: Path) -> Path:
    base = Path(os.environ.get("LLMGEN_CACHE_DIR") or Path.home() / ".cache" / "llmgen")
    digest = hashlib.sha256(source.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    return base / "kernels" / f"{source.stem}-{digest}"


@functools.lru_cache(maxsize=None)
def build(source: Path, what: str, seconds: int) -> None:
    """Load `source`'s library (operators in namespace llmgen_<stem>), building it first where this source
    and torch have none yet; LlmgenError saying why where the build fails."""
    folder = library_dir(source)
    name = f"llmgen_{source.stem}"
    library = folder / f"{name}.so"
    if library.exists():
        torch.ops.load_library(str(library))
        return
    from torch.utils import cpp_extension  # imports setuptools: only when building

    print(f"building {what} for this CPU (once, ~{seconds} s) ...", file=sys.stderr, flush=True)
    work = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LlmgenError(f"could not build {what}: cannot write {work.parent} ({e.strerror}); set LLMGEN_CACHE_DIR "
                          f"to a writable folder") from None
    with contextlib.suppress(ImportError):  # the ninja wheel's binary, where the venv's bin is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cpp_extension.load(name=name, sources=[str(source)], build_directory=str(work), extra_cflags=FLAGS,
                               is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as e:  # compiler missing or failing
        shutil.rmtree(work, ignore_errors=True)
        raise LlmgenError(f"could not build {what} in {work}: {str(e).strip().splitlines()[-1]}") from None
    try:
        work.rename(folder)
    except OSError:  # another process finished the same build first
        shutil.rmtree(work, ignore_errors=True)
