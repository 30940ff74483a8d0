import pytest

from llmgen.data.tokenizer import EOT, SPECIAL_TOKENS, Tokenizer, bytes_tokenizer, train_bpe
from llmgen.errors import LlmgenError

from conftest import shared_file


@pytest.fixture(scope="module")
def oz():
    return shared_file("wizard_of_oz.txt").read_text(encoding="utf-8")


def test_bpe_roundtrip_on_utf8_text(oz):
    assert any(ch in oz for ch in "\u201c\u2014\u2019")  # curly quotes / em dashes are there
    tok = train_bpe([oz], vocab_size=2000)
    assert tok.vocab_size == 2000
    ids = tok.encode(oz)
    assert tok.decode(ids) == oz
    assert len(ids) < len(oz.encode()) / 2.5  # it really merges


def test_bpe_is_deterministic(oz):
    a = train_bpe([oz[:100000]], vocab_size=800)
    b = train_bpe([oz[:100000]], vocab_size=800)
    assert a.sha256() == b.sha256()


def test_bytes_roundtrip_and_ids(oz):
    tok = bytes_tokenizer()
    assert tok.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert tok.encode("Az\u2014") == list("Az\u2014".encode())
    assert tok.tok.encode("Az\u2014").ids == list("Az\u2014".encode())  # the tokenizers model agrees
    assert tok.decode(tok.encode(oz)) == oz
    assert tok.eot_id == 256


def test_special_token_text_is_plain_text():
    tok = bytes_tokenizer()
    assert tok.encode(EOT) == list(EOT.encode())


def test_vocab_smaller_than_byte_alphabet():
    with pytest.raises(LlmgenError, match="smaller than the byte alphabet"):
        train_bpe(["abc"], vocab_size=100)


def test_saved_folder_loads_in_transformers(tmp_path, oz):
    from transformers import AutoTokenizer

    tok = train_bpe([oz[:50000]], vocab_size=700)
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    sample = "Dorothy lived in the midst of the great Kansas prairies \u2014 \u201cwell\u201d."
    assert hf.encode(sample, add_special_tokens=False) == tok.encode(sample)
    assert hf.eos_token == EOT and hf.pad_token == "<|pad|>"
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    again = Tokenizer.load(tmp_path)
    assert again.sha256() == tok.sha256() and again.kind == "bpe" and again.chat_template == tok.chat_template


def test_load_errors(tmp_path):
    with pytest.raises(LlmgenError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LlmgenError, match="not a valid tokenizers file"):
        Tokenizer.load(tmp_path)


def test_batch_encoding_equals_single_encoding(oz):
    """prepare's batched ids-only encoding gives exactly `encode`'s ids (a literal end-of-text in the
    data stays text in both)."""
    tok = train_bpe([oz[:200000]], vocab_size=1000)
    texts = [oz[:50000], oz[50000:120000] + EOT + " after", "", "short"]
    batched = tok.encode_batch(texts)
    assert [b.tolist() for b in batched] == [tok.encode(t) for t in texts]
    assert tok.eot_id not in batched[1].tolist()
