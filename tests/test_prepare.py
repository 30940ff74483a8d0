import json
import os

import numpy as np
import pytest

from llmgen.config import load_config
from llmgen.data.prepare import _is_val, prepare
from llmgen.data.shards import TokenShards, shard_dtype
from llmgen.data.sources import split_safely
from llmgen.data.tokenizer import Tokenizer, bytes_tokenizer, train_bpe
from llmgen.errors import LlmgenError

from conftest import shared_file


def test_shard_dtype_selection():
    assert shard_dtype(256) == np.uint16
    assert shard_dtype(65536) == np.uint16
    assert shard_dtype(65537) == np.uint32
    assert shard_dtype(151_936) == np.uint32


def test_systematic_split_is_exact_and_deterministic():
    flags = [_is_val(i, 0.1) for i in range(1000)]
    assert sum(flags) == 100 and flags[0] and flags[10] and not any(flags[1:10])
    assert [_is_val(i, 0.05) for i in range(3)] == [True, False, False]  # small corpora still get a val doc
    assert flags == [_is_val(i, 0.1) for i in range(1000)]
    assert not any(_is_val(i, 0.0) for i in range(100))


def test_shakespeare_bytes_end_to_end(cli):
    src = shared_file("tinyshakespeare.txt")
    code, out, err = cli("prepare", "--set", f"data.source={src}", "--set", "tokenizer.type=bytes",
                         "--set", "data.val_fraction=0.1", "--set", "data.prepared_dir=prep")
    assert code == 0, err
    meta = json.loads(open("prep/meta.json").read())
    size = src.stat().st_size  # ASCII: one byte per character, one token per byte
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 260 and meta["eot_id"] == 256
    assert meta["train_documents"] == 1 and meta["val_documents"] == 1
    assert meta["train_tokens"] + meta["val_tokens"] == size + 2  # + one end-of-text per split
    assert meta["train_bytes"] + meta["val_bytes"] == size
    assert abs(meta["val_bytes"] - 0.1 * size) < 200  # nanoGPT-style position split (last 10%)
    shards = TokenShards("prep")
    train, val = shards.tokens("train"), shards.tokens("val")
    text = src.read_bytes()
    assert bytes(train[:-1].astype(np.uint8)) + bytes(val[:-1].astype(np.uint8)) == text
    assert train[-1] == 256 and val[-1] == 256
    assert "up to date" in cli("prepare", "--set", f"data.source={src}", "--set", "tokenizer.type=bytes",
                               "--set", "data.val_fraction=0.1", "--set", "data.prepared_dir=prep")[2]


def test_shakespeare_bpe_end_to_end(cli):
    src = shared_file("tinyshakespeare.txt")
    code, out, err = cli("prepare", "--set", f"data.source={src}", "--set", "tokenizer.vocab_size=2048",
                         "--set", "data.val_fraction=0.1", "--set", "data.prepared_dir=prep")
    assert code == 0, err
    meta = json.loads(open("prep/meta.json").read())
    assert meta["vocab_size"] == 2048 and meta["tokenizer_type"] == "bpe"
    tok = Tokenizer.load("prep")
    shards = TokenShards("prep")
    train = np.asarray(shards.tokens("train"))
    assert meta["train_tokens"] == len(train)
    assert len(train) < 0.45 * meta["train_bytes"]  # real merges happened
    text = src.read_text()
    train_text = tok.decode(train[:-1])
    assert train_text + tok.decode(shards.tokens("val")[:-1]) == text
    # prepare encodes ~128K-character parts in parallel: the ids equal encoding the text whole
    assert np.array_equal(train[:-1], tok.encode(train_text))
    assert os.path.isfile("prep/config.yaml")
    assert load_config("prep/config.yaml").tokenizer.vocab_size == 2048


def test_documents_split_by_document(tmp_path):
    lines = [json.dumps({"text": f"document number {i} says hello."}) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    cfg = load_config(None, [f"data.source={tmp_path / 'd.jsonl'}", "tokenizer.type=bytes",
                             "data.val_fraction=0.1", f"data.prepared_dir={tmp_path / 'p'}"])
    meta = prepare(cfg).meta
    assert (meta["train_documents"], meta["val_documents"]) == (36, 4)
    val = TokenShards(tmp_path / "p").tokens("val")
    docs = bytes(x for x in val if x < 256).decode()
    assert docs == "".join(f"document number {i} says hello." for i in (0, 10, 20, 30))


def test_rerun_noop_and_changed_config_reprepares(tmp_path):
    (tmp_path / "a.txt").write_text("hello world. " * 500)
    base = [f"data.source={tmp_path / 'a.txt'}", "tokenizer.type=bytes", f"data.prepared_dir={tmp_path / 'p'}"]
    assert prepare(load_config(None, base)).up_to_date is False
    assert prepare(load_config(None, base)).up_to_date is True
    assert prepare(load_config(None, base + ["data.val_fraction=0.2"])).up_to_date is False
    (tmp_path / "a.txt").write_text("changed text. " * 500)
    res = prepare(load_config(None, base + ["data.val_fraction=0.2"]))
    assert res.up_to_date is False and res.meta["train_bytes"] + res.meta["val_bytes"] == 14 * 500


def test_failure_keeps_previous_output(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(50)))
    out = tmp_path / "p"
    prepare(load_config(None, [f"data.source={good}", "tokenizer.type=bytes", f"data.prepared_dir={out}"]))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" * 3 + "{broken\n")
    with pytest.raises(LlmgenError, match="bad.jsonl:4: not valid JSON"):
        prepare(load_config(None, [f"data.source={bad}", "tokenizer.type=bytes", f"data.prepared_dir={out}"]))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl", "p"]  # no temp folder or lock left


def test_empty_corpus_and_tiny_corpus(tmp_path):
    (tmp_path / "ws.txt").write_text("  \n\n ")
    with pytest.raises(LlmgenError, match="corpus is empty"):
        prepare(load_config(None, [f"data.source={tmp_path / 'ws.txt'}", f"data.prepared_dir={tmp_path / 'p'}"]))
    (tmp_path / "e.txt").write_text("  \n\n ")
    with pytest.raises(LlmgenError, match="corpus is empty"):
        prepare(load_config(None, [f"data.source={tmp_path / 'e.txt'}", 'data.separator="\\n\\n"',
                                   f"data.prepared_dir={tmp_path / 'p'}", "tokenizer.type=bytes"]))
    assert not (tmp_path / "p").exists()


def test_cli_bad_inputs_exit_2(cli, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    for args, needle in ((["--set", "data.source=nope.txt"], "file not found"),
                         (["--set", f"data.source={tmp_path / 'd.jsonl'}"], "no text field 'text'"),
                         (["--set", "tokenizer.vocab_size=100"], "smaller than the byte alphabet")):
        code, out, err = cli("prepare", *args)
        assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "data").exists()


def test_builtin_quickstart_prepare(cli):
    code, out, err = cli("prepare", "--set", "data.builtin_documents=600")
    assert code == 0, err
    meta = json.loads(open("data/quickstart/meta.json").read())
    assert meta["train_documents"] == 570 and meta["val_documents"] == 30
    assert 600 < meta["vocab_size"] <= 1024


def test_safe_parts_encode_like_the_whole():
    text = shared_file("wizard_of_oz.txt").read_text()[:300_000]
    tok = train_bpe([text], 1024)
    parts = split_safely(text, 20_000)
    assert len(parts) > 10 and "".join(parts) == text
    ids = np.concatenate([np.asarray(tok.encode(p)) for p in parts])
    assert np.array_equal(ids, tok.encode(text))


def test_which_tokenizers_cut_safely(tmp_path):
    """prepare cuts long texts into parts only for tokenizers where parts encode like the whole."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    ours = train_bpe(["the cat sat on the mat. " * 200], 300)
    ours.save(tmp_path / "ours")
    (tmp_path / "ours" / "tokenizer_config.json").unlink()  # loads as a plain pretrained tokenizer.json
    assert ours.cuts_safely and Tokenizer.load(tmp_path / "ours").cuts_safely
    assert not bytes_tokenizer().cuts_safely

    def pretrained(pre):
        hf = HFTokenizer(models.BPE(vocab={"a": 0, "<|endoftext|>": 1}, merges=[]))
        hf.pre_tokenizer = pre
        return Tokenizer(hf, kind="pretrained")

    assert pretrained(pre_tokenizers.ByteLevel(add_prefix_space=False)).cuts_safely
    assert not pretrained(pre_tokenizers.ByteLevel(add_prefix_space=True)).cuts_safely  # a prefix space per part
    assert not pretrained(pre_tokenizers.Metaspace()).cuts_safely  # SentencePiece-style


def test_bpe_training_in_parts_learns_the_same_tokenizer(tmp_path):
    """prepare trains BPE on small parts of each piece (less memory); the vocabulary is the one the
    whole text gives, also for a text with no newline at all."""
    import random

    rng = random.Random(0)
    words = ["the", "king", "queen", "castle", "rides", "north", "storm", "gold", "silver", "night"]
    text = " ".join(rng.choice(words) + rng.choice(["", "s", "ed", "ing"]) for _ in range(40000))  # one line
    (tmp_path / "one.txt").write_text(text)
    out = tmp_path / "p"
    prepare(load_config(None, [f"data.source={tmp_path / 'one.txt'}", f"data.prepared_dir={out}",
                               "tokenizer.vocab_size=300"]))
    parts = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    whole = json.loads(train_bpe([text], 300).tok.to_str())["model"]["vocab"]
    assert parts == whole and len(text) > 4 * (1 << 14)  # the text was cut into several parts
