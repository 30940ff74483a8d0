"""The one record reader: every format, locations as an editor numbers them, one error form."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from llmgen.data.records import field, read_records
from llmgen.errors import LlmgenError
from llmgen.evaluate.runner import read_predictions
from llmgen.generate.files import read_prompts

ROWS = [{"text": "a"}, {"text": "b"}]


def test_every_format_yields_records_with_their_location(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    (tmp_path / "d.json").write_text(json.dumps({"data": ROWS}))
    pd.DataFrame(ROWS).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("first\n\nsecond\n")
    got = {s: [(r, w.replace(str(tmp_path) + "/", "")) for r, w in read_records(str(tmp_path / f"d.{s}"))]
           for s in ("jsonl", "json", "csv", "parquet")}
    assert got["jsonl"] == [(ROWS[0], "d.jsonl:1"), (ROWS[1], "d.jsonl:3")]  # the blank line 2 is skipped
    assert got["json"] == [(ROWS[0], "d.json record 1"), (ROWS[1], "d.json record 2")]
    assert got["csv"] == [(ROWS[0], "d.csv:2"), (ROWS[1], "d.csv:3")]  # line 1 is the header
    assert got["parquet"] == [(ROWS[0], "d.parquet row 1"), (ROWS[1], "d.parquet row 2")]
    assert [r for r, _ in read_records(str(tmp_path / "d.txt"))] == [{"text": "first\n\nsecond\n"}]
    lines = [(r, w.rsplit("/", 1)[1]) for r, w in read_records(str(tmp_path / "d.txt"), txt_lines=True)]
    assert lines == [("first", "d.txt:1"), ("second", "d.txt:3")]
    builtin = list(read_records("builtin:instructions", n_builtin=3))
    assert len(builtin) == 3 and builtin[0][1] == "builtin:instructions record 1"


@pytest.mark.parametrize("name,content,message", [
    ("bad.jsonl", '{"text": "a"}\n{oops\n', r"bad.jsonl:2: not valid JSON \(.*\); each line must be one JSON object"),
    ("bad.json", '[{"text": 1},\n  {oops]', r"bad.json:2: not valid JSON"),
    ("bad.json", '{"a": 1}', r"bad.json: expected a JSON list of records"),
    ("bad.yaml", "text: a", r"unsupported file type '.yaml'; use .jsonl, .json"),
])
def test_bad_files_get_one_line_naming_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(LlmgenError, match=message) as e:
        list(read_records(str(tmp_path / name)))
    assert "\n" not in str(e.value)


def test_missing_and_folder_and_field_errors(tmp_path):
    with pytest.raises(LlmgenError, match="--input-file .*nope.jsonl: file not found"):
        list(read_records(str(tmp_path / "nope.jsonl"), what="--input-file"))
    with pytest.raises(LlmgenError, match="is a folder; give a file"):
        list(read_records(str(tmp_path)))
    with pytest.raises(LlmgenError, match=r"x:3: field 'text' is int, expected a string; fix it"):
        field({"text": 3}, "text", "x:3", "fix it")


def test_prompts_and_predictions_go_through_the_reader(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "hi", "id": 1}) + "\n" + json.dumps("bare string") + "\n")
    assert read_prompts(p) == [{"prompt": "hi", "id": 1}, {"prompt": "bare string"}]
    p.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(LlmgenError, match=r"p.jsonl:2: each record needs a `prompt`"):
        read_prompts(p)
    csv = tmp_path / "pred.csv"
    pd.DataFrame([{"prediction": "a b", "reference": "a c"}]).to_csv(csv, index=False)
    assert read_predictions(csv) == (["a b"], [["a c"]], [""])
    (tmp_path / "pred.jsonl").write_text(json.dumps({"prediction": "a"}) + "\n")
    with pytest.raises(LlmgenError, match=r"pred.jsonl:1: missing field `reference`"):
        read_predictions(tmp_path / "pred.jsonl")
