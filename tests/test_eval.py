"""Evaluation: metrics equal the reference libraries, perplexity equals a hand computation, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmgen.config import ModelConfig
from llmgen.data.tokenizer import bytes_tokenizer
from llmgen.errors import LlmgenError
from llmgen.evaluate.metrics import load_metric
from llmgen.evaluate.perplexity import activation_bytes, perplexity, token_nll, windows
from llmgen.model.checkpoint import save_checkpoint
from llmgen.model.transformer import Transformer

PREDS = ["The cat sat on the mat.", "", "Grüße aus Köln — schön!", "running dogs ran quickly"]
REFS = ["The cat is on the mat.", "Nothing here.", "Grüße aus Köln, schön.", "the dog runs quick"]


def test_bleu_and_chrf_equal_sacrebleu():
    import sacrebleu

    ours = load_metric("bleu").compute(predictions=PREDS, references=[[r] for r in REFS])
    assert ours["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score, abs=1e-9)
    assert ours["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert len(ours["per_example"]) == 4
    multi = [["The cat is on the mat.", "A cat sat on the mat."], ["Nothing here."], ["x"], ["y", "z"]]
    streams = [[m[0] for m in multi], [m[1] if len(m) > 1 else m[0] for m in multi]]
    got = load_metric("bleu").compute(predictions=PREDS, references=multi)["bleu"]
    assert got == pytest.approx(sacrebleu.corpus_bleu(PREDS, streams).score, abs=1e-9)
    assert load_metric("chrf").compute(predictions=PREDS, references=REFS)["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(PREDS, [REFS]).score, abs=1e-9)


def test_rouge_equals_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(PREDS, REFS)]
    ours = load_metric("rouge").compute(predictions=PREDS, references=REFS)
    for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert ours[k] == pytest.approx(sum(d[k].fmeasure for d in direct) / len(direct), abs=1e-12)
    assert ours["per_example"][1]["rouge1"] == 0.0  # the empty prediction
    boot = load_metric("rouge").compute(predictions=PREDS, references=REFS, aggregation="bootstrap")
    assert 0.0 <= boot["rougeL"] <= 1.0


def test_unknown_metric_lists_available():
    with pytest.raises(LlmgenError, match="did you mean 'rouge'.*available: ppl, bleu, chrf, rouge"):
        load_metric("rogue")


def _tiny(seed=0, max_seq_len=16):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(preset=None, n_layer=1, n_head=2, d_model=16, max_seq_len=max_seq_len,
                                   vocab_size=260)).eval()


def test_sliding_window_perplexity_equals_hand_computation():
    model = _tiny()
    ids = torch.randint(0, 256, (41,))
    # by hand: each token j >= 1 scored once, with context from its window start
    total, n = 0.0, 0
    for begin, end, first in windows(len(ids), 16, 6):
        with torch.no_grad():
            logp = model(ids[begin:end][None])[0].log_softmax(-1)
        for j in range(first, end):
            total -= float(logp[j - begin - 1, ids[j]])
            n += 1
    assert n == len(ids) - 1
    res = perplexity(model, ids.numpy(), n_bytes=41, stride=6, batch_size=3)
    assert res.tokens == 40 and res.loss == pytest.approx(total / n, rel=1e-5)
    assert res.ppl == pytest.approx(math.exp(total / n), rel=1e-5)
    assert res.bits_per_byte == pytest.approx(total / math.log(2) / 41, rel=1e-5)


def test_long_windows_take_fewer_a_forward_and_score_the_same():
    model = _tiny()
    ids = torch.randint(0, 256, (90,)).numpy()
    batches = []
    model.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    whole = perplexity(model, ids, stride=4, batch_size=8)
    assert max(batches) == 8
    batches.clear()
    split = perplexity(model, ids, stride=4, batch_size=8, max_bytes=3 * 16 * activation_bytes(model.cfg))
    assert max(batches) == 3 and split.tokens == whole.tokens == 89
    assert split.loss == pytest.approx(whole.loss, rel=1e-6)


class _RowsSeen(torch.nn.Module):
    """A head that records how many rows each call gives it."""

    def __init__(self, head):
        super().__init__()
        self.head, self.rows = head, []

    def forward(self, h):
        self.rows.append(h.reshape(-1, h.shape[-1]).shape[0])
        return self.head(h)


def test_token_nll_takes_the_head_a_chunk_of_target_rows_at_a_time():
    # evaluation never holds the (B, T, V) logits: SmolLM2's 8 x 8,192-token windows were 12.9 GB of them
    model = _tiny(max_seq_len=32)
    x, t = torch.randint(0, 256, (3, 32)), torch.randint(0, 260, (3, 32))
    t[0, :10] = -100
    t[2] = -100
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(x).reshape(-1, 260), t.reshape(-1), ignore_index=-100,
                                                reduction="sum")
        model.lm_head = seen = _RowsSeen(model.lm_head)
        got = token_nll(model, x, t, chunk_bytes=4 * 260 * 7)  # 7 rows a chunk
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    assert max(seen.rows) == 7 and sum(seen.rows) == 54  # only rows with a target reach the head


@pytest.fixture
def ckpt(tmp_path):
    tok_dir = tmp_path / "tok"
    bytes_tokenizer().save(tok_dir)
    folder = tmp_path / "run" / "final"
    save_checkpoint(folder, _tiny(max_seq_len=64), tok_dir, {"step": 0})
    return folder


def test_cli_eval_generates_scores_and_writes_report(cli, ckpt, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}", "reference": w}) + "\n" for w in ["hi", "yes", "no"]))
    text = tmp_path / "t.txt"
    text.write_text("Some text to measure. " * 10)
    out = tmp_path / "res.json"
    code, stdout, err = cli("eval", "--model", ckpt, "--metrics", "bleu,rouge", "--data", data, "--output", out,
                            "--samples", "2", "--set", "generate.max_new_tokens=8")
    assert code == 0, err
    rep = json.loads(out.read_text())
    r = rep["results"][0]
    assert len(r["examples"]) == 3 and "rougeL" in r["scores"] and "signature" in r["config"]["bleu"]
    assert r["config"]["generation"]["temperature"] == 0.0 and "torch" in rep["versions"]
    assert len((tmp_path / "res.samples.jsonl").read_text().splitlines()) == 2
    code, stdout, err = cli("eval", "--model", ckpt, "--model", ckpt, "--metrics", "ppl", "--data", text, "--output", out)
    assert code == 0, err
    rep = json.loads(out.read_text())
    assert rep["results"][0]["scores"]["ppl"] == pytest.approx(rep["results"][1]["scores"]["ppl"])
    assert rep["results"][0]["scores"]["bits_per_byte"] > 0 and (tmp_path / "res.png").is_file()


def test_cli_eval_predictions_and_errors(cli, tmp_path):
    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps({"prediction": p, "reference": [r]}) + "\n" for p, r in zip(PREDS, REFS)))
    code, stdout, err = cli("eval", "--predictions", preds, "--metrics", "bleu,rouge", "--output", tmp_path / "o.json")
    assert code == 0, err
    import sacrebleu

    got = json.loads((tmp_path / "o.json").read_text())["results"][0]["scores"]["bleu"]
    assert got == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prediction": "a", "reference": "b"}\n{"prediction": "c"}\n')
    code, _, err = cli("eval", "--predictions", bad, "--metrics", "bleu")
    assert code == 2 and "bad.jsonl:2" in err and "reference" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = cli("eval", "--predictions", empty, "--metrics", "bleu")
    assert code == 2 and "empty" in err
    code, _, err = cli("eval", "--predictions", preds, "--metrics", "blue")
    assert code == 2 and "bleu" in err


def test_cli_eval_ppl_without_data_for_this_tokenizer_measures_the_builtin_stories(cli, ckpt, tmp_path):
    # an imported model has no prepared val.bin of its own tokenizer: the default is text it can read, not an error
    out = tmp_path / "res.json"
    code, _, err = cli("eval", "--model", ckpt, "--metrics", "ppl", "--output", out, "--set", "data.prepared_dir=nowhere")
    assert code == 0, err
    assert "nowhere has no prepared data; measuring on builtin:stories" in err
    res = json.loads(out.read_text())["results"][0]
    assert res["config"]["ppl"]["data"] == "builtin:stories" and res["scores"]["ppl"] > 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({"tokenizer_sha256": "not-this-one"}))
    code, _, err = cli("eval", "--model", ckpt, "--metrics", "ppl", "--output", out, "--set", "data.prepared_dir=other")
    assert code == 0 and "other was prepared with another tokenizer" in err, err
    assert json.loads(out.read_text())["results"][0]["scores"]["ppl"] == pytest.approx(res["scores"]["ppl"])
    assert res["config"]["ppl"]["window"] == 64  # the model's context
    code, _, err = cli("eval", "--model", ckpt, "--metrics", "ppl", "--output", out, "--set", "data.prepared_dir=other",
                       "--set", "eval.window=32")
    assert code == 0, err
    assert json.loads(out.read_text())["results"][0]["config"]["ppl"]["window"] == 32
