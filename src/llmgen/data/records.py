"""The one record reader: every file of records llmgen reads goes through `read_records`.

    .jsonl        one JSON value per line (blank lines skipped)
    .json         a list of records, or an object holding one list
    .csv          rows under a header line (datasets' csv builder)
    .parquet      rows (datasets' parquet builder)
    .txt          the whole file as one record {text_field: ...}, or with `txt_lines` one per line
    hf:NAME[:CONFIG]        a Hugging Face hub dataset (streamed)
    builtin:instructions[:eval]   the synthetic demo instructions

Each record comes with where it is, numbered as a person sees it in an editor (`file.jsonl:3`,
`file.csv:5` counts the header line, `file.json record 2`, `file.parquet row 2`), and every problem is
one `LlmgenError` in one form: `where: what is wrong; how to fix it`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from llmgen.data.demo import iter_instructions
from llmgen.errors import LlmgenError
from llmgen.hub import require_hub

RECORD_FILES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def read_records(source: str, *, what: str = "dataset", text_field: str = "text", errors: str = "strict",
                 split: str = "train", streaming: bool = True, seed: int = 1337, n_builtin: int = 2000,
                 txt_lines: bool = False) -> Iterator[tuple[Any, str]]:
    """(record, where) for every record of `source` (see the module docstring). `what` names the source
    in messages (e.g. "--input-file"); `errors` is how undecodable UTF-8 is handled ("strict" or "replace")."""
    if source.startswith("builtin:instructions"):
        part = "eval" if source.endswith(":eval") else "train"
        for i, rec in enumerate(iter_instructions(n_builtin if part == "train" else 200, seed, part)):
            yield rec, f"{source} record {i + 1}"
        return
    if source.startswith("hf:"):
        yield from _hub_records(source, split, streaming)
        return
    path = Path(source)
    if path.is_dir():
        raise LlmgenError(f"{what} {path} is a folder; give a file ({', '.join(RECORD_FILES)})")
    if not path.is_file():
        raise LlmgenError(f"{what} {source}: file not found; give a {'/'.join(RECORD_FILES)} file, hf:<name> or "
                          f"builtin:instructions")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl(path, errors)
    elif suffix == ".json":
        yield from _json(path)
    elif suffix in (".csv", ".parquet"):
        yield from _table(path, suffix[1:])
    elif suffix == ".txt":
        text = _read_text(path, errors)
        if txt_lines:
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    yield line, f"{path}:{n}"
        else:
            yield {text_field: text}, str(path)
    else:
        raise LlmgenError(f"{what} {source}: unsupported file type {path.suffix!r}; use "
                          f"{', '.join(RECORD_FILES)}")


def field(rec: Any, name: str, where: str, fix: str) -> str:
    """The string field `name` of a record, or one clear error (`fix` says how to point at another)."""
    if not isinstance(rec, dict):
        raise LlmgenError(f"{where}: expected a JSON object with a {name!r} field, got {type(rec).__name__}; {fix}")
    if name not in rec:
        keys = ", ".join(map(str, list(rec)[:8])) or "none"
        raise LlmgenError(f"{where}: no text field {name!r} (found: {keys}); {fix}")
    value = rec[name]
    if not isinstance(value, str):
        raise LlmgenError(f"{where}: field {name!r} is {type(value).__name__}, expected a string; {fix}")
    return value


def _read_text(path: Path, errors: str) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise LlmgenError(f"{path}: invalid UTF-8 at byte offset {e.start}; fix the file or set "
                          f"data.on_decode_error: replace") from None


def _jsonl(path: Path, errors: str) -> Iterator[tuple[Any, str]]:
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as e:
                raise LlmgenError(f"{path}:{n}: invalid UTF-8 at byte {e.start} of the line; fix it or set "
                                  f"data.on_decode_error: replace") from None
            if not line.strip():
                continue
            try:
                yield json.loads(line), f"{path}:{n}"
            except json.JSONDecodeError as e:
                raise LlmgenError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); each line must be "
                                  f"one JSON object") from None


def _json(path: Path) -> Iterator[tuple[Any, str]]:
    try:
        data = json.loads(_read_text(path, "strict"))
    except json.JSONDecodeError as e:
        raise LlmgenError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); fix the file") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise LlmgenError(f"{path}: expected a JSON list of records (or an object holding one list); use "
                              f".jsonl for one record per line")
        data = lists[0]
    if not isinstance(data, list):
        raise LlmgenError(f"{path}: expected a JSON list of records; use .jsonl for one record per line")
    for i, rec in enumerate(data):
        yield rec, f"{path} record {i + 1}"


def _table(path: Path, kind: str) -> Iterator[tuple[Any, str]]:
    import datasets  # slow to import (pyarrow, pandas): only for tables and the hub

    first = 2 if kind == "csv" else 1  # a CSV's line 1 is its header
    where = (lambda i: f"{path}:{i + first}") if kind == "csv" else (lambda i: f"{path} row {i + first}")
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True)
        for i, row in enumerate(ds):
            yield row, where(i)
    except LlmgenError:
        raise
    except Exception as e:  # pyarrow/pandas parse errors
        raise LlmgenError(f"{path}: cannot be read as {kind}: {str(e).splitlines()[0][:200]}; fix the file") from None


def _hub_records(source: str, split: str, streaming: bool) -> Iterator[tuple[Any, str]]:
    import datasets  # slow to import (pyarrow, pandas): only for tables and the hub

    require_hub(source)
    repo, _, subset = source[3:].partition(":")
    try:
        ds = datasets.load_dataset(repo, subset or None, split=split, streaming=streaming)
    except Exception as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise LlmgenError(f"{source}: could not load it from the Hugging Face hub ({reason}); this source needs "
                          f"network access, or point at a local copy") from None
    for i, row in enumerate(ds):
        yield row, f"{source} row {i + 1}"
