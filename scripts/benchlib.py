"""What every bench_*.py does at the end: record the machine, write JSON, print a markdown table."""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmgen.kernels.precision import cpu_name


def report(out: str, result: dict, header: list[str], lines: list[list]) -> None:
    """Add the machine to `result`, write it to `out` as JSON and print `lines` as a markdown table."""
    result = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", **result}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"machine: {result['machine']}")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in lines:
        print("| " + " | ".join(str(c) for c in cells) + " |")
