from pathlib import Path

import pytest

import llmgen.data.prepare as prep
from llmgen.config import MODEL_PRESETS, Config, build_config, load_config
from llmgen.errors import LlmgenError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="exp.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_the_quickstart():
    cfg = load_config()
    assert cfg.data.source == "builtin:stories"
    assert cfg.model.n_layer == MODEL_PRESETS["quickstart"]["n_layer"]
    assert cfg == load_config(REPO / "configs" / "quickstart.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert isinstance(cfg, Config)


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "train:\n  max_steps: 10\n  lr: 1e-3\nmodel:\n  preset: tiny\n")
    cfg = load_config(p, ["train.max_steps=20", "train.batch_size=3", "data.source=[a.txt, b.txt]",
                          "generate.stop=END", "model.n_layer=3"])
    assert cfg.train.max_steps == 20 and cfg.train.batch_size == 3
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.source == ["a.txt", "b.txt"]
    assert cfg.generate.stop == ["END"]
    assert cfg.model.n_layer == 3 and cfg.model.d_model == MODEL_PRESETS["tiny"]["d_model"]


def test_unknown_key_suggests(tmp_path):
    p = write(tmp_path, "train:\n  max_stesp: 10\n")
    with pytest.raises(LlmgenError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "train.max_stesp" in msg and "did you mean 'max_steps'" in msg


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(LlmgenError, match="unknown key tokeniser.*did you mean 'tokenizer'"):
        load_config(write(tmp_path, "tokeniser:\n  type: bpe\n"))


def test_unknown_key_in_override():
    with pytest.raises(LlmgenError, match="unknown key train.lrr.*did you mean 'lr'"):
        load_config(None, ["train.lrr=0.1"])


def test_wrong_type(tmp_path):
    with pytest.raises(LlmgenError, match=r"train.max_steps = 'ten' is not an integer"):
        load_config(write(tmp_path, "train:\n  max_steps: ten\n"))
    with pytest.raises(LlmgenError, match=r"model.tie_embeddings = 3 is not true/false"):
        load_config(None, ["model.tie_embeddings=3"])


def test_out_of_range():
    with pytest.raises(LlmgenError, match=r"data.val_fraction = 0.9 is out of range; allowed: >= 0.0 and <= 0.5"):
        load_config(None, ["data.val_fraction=0.9"])
    with pytest.raises(LlmgenError, match=r"generate.top_p = 0 is out of range; allowed: > 0.0"):
        load_config(None, ["generate.top_p=0"])


def test_bad_choice_suggests():
    with pytest.raises(LlmgenError, match=r"tokenizer.type = 'bpee' is not one of .*did you mean 'bpe'"):
        load_config(None, ["tokenizer.type=bpee"])


def test_malformed_yaml_names_line(tmp_path):
    p = write(tmp_path, "train:\n  max_steps: 10\n  lr: [1, 2\nmodel:\n  n_layer: 2\n")
    with pytest.raises(LlmgenError, match=r"exp.yaml: line \d+, column \d+: malformed YAML"):
        load_config(p)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(LlmgenError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(LlmgenError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_consistency_checks():
    with pytest.raises(LlmgenError, match="divisible by model.n_head"):
        build_config({"model": {"d_model": 100, "n_head": 3}})
    with pytest.raises(LlmgenError, match="multiple of model.n_kv_head"):
        build_config({"model": {"n_head": 4, "n_kv_head": 3}})
    with pytest.raises(LlmgenError, match="unknown.*did you mean 'small'"):
        build_config({"model": {"preset": "smal"}})


def test_nested_list_of_sections():
    cfg = build_config({"finetune": {"datasets": [{"source": "a.jsonl", "format": "alpaca", "weight": 2}]}})
    assert cfg.finetune.datasets[0].format == "alpaca" and cfg.finetune.datasets[0].weight == 2.0
    with pytest.raises(LlmgenError, match=r"finetune.datasets\[0\].wieght.*did you mean 'weight'"):
        build_config({"finetune": {"datasets": [{"source": "a.jsonl", "wieght": 2}]}})


def test_roundtrip_through_yaml(tmp_path):
    cfg = load_config(None, ["train.max_steps=7", "model.preset=small"])
    p = write(tmp_path, cfg.to_yaml())
    assert load_config(p) == cfg


# ---- through the real CLI ----------------------------------------------------------------------


def test_cli_print_config(cli):
    code, out, err = cli("prepare", "--print-config", "--set", "train.max_steps=42")
    assert code == 0, err
    assert "max_steps: 42" in out and "source: builtin:stories" in out


def test_cli_config_errors_are_one_line_exit_2(cli, tmp_path):
    bad = write(tmp_path, "train:\n  max_stesp: 10\n")
    for args in (["prepare", "--config", str(bad)], ["pretrain", "--set", "train.lr=-1"],
                 ["prepare", "--config", str(tmp_path / "missing.yaml")],
                 ["prepare", "--config", str(write(tmp_path, "a: [1\n", "broken.yaml"))]):
        code, out, err = cli(*args)
        assert code == 2, (args, err)
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err


def test_cli_version_and_help(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip().startswith("llmgen ")
    for command in ("prepare", "pretrain", "finetune", "eval", "evaluate", "generate", "chat", "import", "export"):
        code, out, err = cli(command, "--help")
        assert code == 0 and "Usage" in out, (command, err)


def test_python_dash_m_and_console_script(tmp_path):
    import shutil
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "llmgen", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("llmgen ")
    exe = shutil.which("llmgen", path=str(Path(sys.executable).parent))
    assert exe, "the llmgen console script is not installed next to this Python"
    bad = subprocess.run([exe, "prepare", "--set", "train.max_stesp=1"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "did you mean 'max_steps'" in bad.stderr


def test_cli_bug_exits_1_with_traceback_behind_debug(cli, monkeypatch):
    def boom(cfg, force=False):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(prep, "prepare", boom)
    code, out, err = cli("prepare")
    assert code == 1 and "internal error: RuntimeError: simulated bug" in err and "--debug" in err
    assert "Traceback" not in err
    code, out, err = cli("--debug", "prepare")
    assert code == 1 and "Traceback (most recent call last)" in err


def test_commands_without_a_model_say_what_to_run_first(cli):
    for args in (["finetune"], ["eval", "--metrics", "bleu"], ["generate", "Once upon a time"], ["chat"], ["export"]):
        code, out, err = cli(*args)
        assert code == 2 and "llmgen pretrain" in err and len(err.strip().splitlines()) == 1, (args, err)


def test_cli_unknown_option_is_a_usage_error_exit_2(cli):
    """A mistyped flag is the user's error (exit 2, with click's suggestion), not an internal one."""
    code, out, err = cli("generate", "--max-new-tokns", "5")
    assert code == 2, err
    assert "No such option: --max-new-tokns" in err and "--max-new-tokens" in err
    assert "internal error" not in err
