import json

import pytest

from llmgen import hub
from llmgen.config import DataConfig
from llmgen.data import sources
from llmgen.data.sources import Corpus, split_on, text_file_pieces
from llmgen.data.tokenizer import train_bpe
from llmgen.errors import LlmgenError

from conftest import shared_file


def texts(**kw):
    return ["".join(d.pieces) for d in Corpus(DataConfig(**kw)).documents()]


def test_txt_one_document_per_file_and_crlf(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"line one\r\nline two\r\n")
    assert texts(source=str(tmp_path / "a.txt")) == ["line one\nline two\n"]


def test_txt_separator(tmp_path):
    (tmp_path / "a.txt").write_text("first doc<|endoftext|>second doc<|endoftext|>\n")
    assert texts(source=str(tmp_path / "a.txt"), separator="<|endoftext|>") == ["first doc", "second doc"]
    (tmp_path / "b.txt").write_text("para one\nstill one\n\npara two\n\n\n")
    assert texts(source=str(tmp_path / "b.txt"), separator="\n\n") == ["para one\nstill one", "para two"]


def test_split_on_across_piece_boundaries():
    assert list(split_on(["ab|", "|cd||", "e"], "||")) == ["ab", "cd", "e"]


def test_jsonl_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "hello"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    assert texts(source=str(p)) == ["hello", "world"]
    p.write_text(json.dumps({"text": "ok"}) + "\n{not json}\n")
    with pytest.raises(LlmgenError, match=r"d.jsonl:2: not valid JSON"):
        texts(source=str(p))
    p.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(LlmgenError, match=r"d.jsonl:1: no text field 'text' \(found: body\); set data.text_field"):
        texts(source=str(p))
    assert texts(source=str(p), text_field="body") == ["x"]


def test_json_parquet_csv(tmp_path):
    rows = [{"text": "alpha beta"}, {"text": "gamma"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert texts(source=str(tmp_path / "d.json")) == ["alpha beta", "gamma"]
    import pandas as pd

    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    assert texts(source=str(tmp_path / "d.parquet")) == ["alpha beta", "gamma"]
    assert texts(source=str(tmp_path / "d.csv")) == ["alpha beta", "gamma"]
    with pytest.raises(LlmgenError, match=r"d.csv:2: no text field 'content'"):  # line 1 is the header
        texts(source=str(tmp_path / "d.csv"), text_field="content")
    with pytest.raises(LlmgenError, match=r"d.parquet row 1: no text field 'content'"):
        texts(source=str(tmp_path / "d.parquet"), text_field="content")


def test_folder_glob_and_list(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "sub" / "a.txt").write_text("A")
    (tmp_path / "ignored.bin").write_bytes(b"\0")
    assert texts(source=str(tmp_path)) == ["B", "A"]  # sorted by path: b.txt < sub/a.txt
    assert texts(source=str(tmp_path / "**" / "*.txt")) == ["B", "A"]
    assert texts(source=[str(tmp_path / "sub" / "a.txt"), str(tmp_path / "b.txt")]) == ["A", "B"]
    assert texts(source=str(tmp_path), max_documents=1) == ["B"]


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(LlmgenError, match="file not found"):
        Corpus(DataConfig(source=str(tmp_path / "nope.txt")))
    (tmp_path / "x.docx").write_text("x")
    with pytest.raises(LlmgenError, match="unsupported file type '.docx'"):
        Corpus(DataConfig(source=str(tmp_path / "x.docx")))
    with pytest.raises(LlmgenError, match="matches no files"):
        Corpus(DataConfig(source=str(tmp_path / "*.md")))
    with pytest.raises(LlmgenError, match="not a built-in corpus"):
        Corpus(DataConfig(source="builtin:poems"))


def test_invalid_utf8_reported_with_offset_or_replaced(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"good text " + b"\xff" + b" more")
    with pytest.raises(LlmgenError, match=r"bad.txt: invalid UTF-8 at byte offset 10"):
        texts(source=str(p))
    assert texts(source=str(p), on_decode_error="replace") == ["good text \ufffd more"]


def test_invalid_utf8_offset_in_later_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 64)
    p = tmp_path / "bad.txt"
    data = ("é" * 40).encode() + b"abc\xfe"  # the bad byte sits in the second chunk
    p.write_bytes(data)
    with pytest.raises(LlmgenError, match=rf"byte offset {len(data) - 1}\b"):
        texts(source=str(p))


def test_builtin_sources():
    stories = texts(source="builtin:stories", builtin_documents=5)
    assert len(stories) == 5 and all(len(s) > 200 for s in stories)
    pairs = texts(source="builtin:instructions", builtin_documents=4)
    assert len(pairs) == 4


def test_chunked_reading_never_changes_tokens(tmp_path, monkeypatch):
    """Pieces are cut only where byte-level BPE splits anyway: same ids as encoding the whole text."""
    text = shared_file("wizard_of_oz.txt").read_text(encoding="utf-8")[:60000]
    p = tmp_path / "w.txt"
    p.write_text(text)
    monkeypatch.setattr(sources, "CHUNK_BYTES", 997)
    pieces = list(text_file_pieces(p))
    assert len(pieces) > 20 and "".join(pieces) == text
    tok = train_bpe([text], vocab_size=600)
    whole = tok.encode(text)
    chunked = [i for piece in pieces for i in tok.encode(piece)]
    assert chunked == whole


def test_hub_source_offline_fails_clearly(monkeypatch):
    monkeypatch.setattr(hub, "HUB_HOST", "hub.invalid")  # a name that never resolves: offline for sure
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(LlmgenError, match=r"hf:no-such-user/no-such-dataset: needs the Hugging Face hub.*cannot be reached"):
        texts(source="hf:no-such-user/no-such-dataset")
