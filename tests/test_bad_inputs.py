"""A newcomer's wrong inputs to ``gsq-hf``: exit code 2 and one stderr line naming the file or value, no traceback.

Each case is a bad file or directory (made in ``tmp_path``) given to ``gsq_hf.cli.main`` in-process; the
check is the whole contract: exit 2, exactly one non-empty stderr line, the path named, no "Traceback".
"""

from __future__ import annotations

import shutil

import pytest
from models import tiny_mamba
from transformers import GPT2Config, GPT2LMHeadModel

import gsq_hf
from gsq_hf.cli import main
from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR
from gsq_hf.eval.data import EvalInputError, ModelNotFoundError, load_model, load_tokenizer

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xf0\x9f"


def _error_line(capsys, *args: str) -> str:
    """Run ``gsq-hf eval ARGS --quiet``; assert the bad-input contract; return the one error line."""
    code = main(["eval", *args, "--context", "16", "--max-tokens", "64", "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("gsq-hf eval: error: "), lines[0]
    return lines[0]


# -- config files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("file, content, message", [
    ("list.yaml", "- a\n- b\n", "holds a YAML list, not a mapping of fields; accepted: a YAML mapping"),
    ("syntax.yaml", "policy: [static\n", "is not valid YAML at line 2, column 1"),
    ("tag.yaml", "x: !!python/object:os.system {}\n", "only plain YAML is accepted"),
    ("bad.json", '{"policy": ', "is not valid JSON: line 1, column 12"),
    ("list.json", "[1, 2]", "holds a JSON list, not a mapping"),
])
def test_bad_config_file(tmp_path, capsys, file, content, message):
    path = tmp_path / file
    path.write_text(content)
    line = _error_line(capsys, "--config", str(path))
    assert f"config file {str(path)!r}" in line and message in line, line


# -- datasets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("file, content, message", [
    ("image.txt", PNG, "is not UTF-8 text (byte 0x89 at offset 0); accepted: 'builtin'"),
    ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}\xf0\x9f\x98", "is not UTF-8 text"),
    ("empty.txt", b" \n", "the evaluation text is empty: dataset"),
    ("empty.jsonl", b'{"text": ""}\n\n', "the evaluation text is empty: dataset"),
    ("body.jsonl", b'{"body": "x"}\n', 'body.jsonl:1 has no string "text" field'),
    ("broken.jsonl", b'{"text": "a"}\n{"text": \n', "broken.jsonl:2 is not valid JSON"),
])
def test_bad_dataset_file(tmp_path, capsys, file, content, message):
    path = tmp_path / file
    path.write_bytes(content)
    line = _error_line(capsys, "--dataset", str(path))
    assert str(path) in line and message in line, line


def test_dataset_directory(tmp_path, capsys):
    (tmp_path / "notes.md").write_text("not .txt/.raw")
    assert f"directory {str(tmp_path)!r} holds no .txt or .raw file" in _error_line(capsys, "--dataset", str(tmp_path))
    (tmp_path / "a.txt").write_bytes(PNG)
    assert f"{str(tmp_path / 'a.txt')!r} is not UTF-8 text" in _error_line(capsys, "--dataset", str(tmp_path))


# -- models ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_without_tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(directory)
    return str(directory)


def test_directory_without_config_json(tmp_path, capsys):
    shutil.copy(BUILTIN_MODEL_DIR / "tokenizer.json", tmp_path)  # a tokenizer alone is not a model
    line = _error_line(capsys, "--model", str(tmp_path))
    assert f"{str(tmp_path)!r}: the directory has no config.json, so it is not a transformers model" in line, line


def test_unsupported_model_is_refused_from_its_config(gpt2_without_tokenizer, capsys, monkeypatch):
    import transformers

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the tokenizer is read before the model is checked")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_tokenizer)
    line = _error_line(capsys, "--model", gpt2_without_tokenizer)
    assert f"model {gpt2_without_tokenizer!r}: GPT2LMHeadModel (model_type='gpt2') has no Mamba-family mixer" in line
    for load in (load_tokenizer, load_model):
        with pytest.raises(gsq_hf.UnsupportedModelError, match="supported families: mamba"):
            load(gpt2_without_tokenizer)


def test_mamba_without_tokenizer(tmp_path, capsys):
    tiny_mamba().save_pretrained(tmp_path)
    capsys.readouterr()  # the save's progress bar
    line = _error_line(capsys, "--model", str(tmp_path))
    assert f"model {str(tmp_path)!r} has no tokenizer" in line and "tokenizer.save_pretrained(DIR)" in line, line
    with pytest.raises(EvalInputError, match="has no tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("path", ["./no-such-model", "~/no-such-gsq-model", "no/such/model", "no-such-model/", "{tmp}"])
def test_missing_local_model_path(tmp_path, capsys, path):
    path = path.format(tmp=tmp_path / "nope")
    line = _error_line(capsys, "--model", path)
    assert f"model {path!r}: no such directory, and not a valid Hub id" in line, line
    assert "'state-spaces/mamba-130m-hf'" in line
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        load_model(path)


def test_file_as_model(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 8)
    line = _error_line(capsys, "--model", str(tmp_path / "model.safetensors"))
    assert "model.safetensors' is a file, not a model directory; accepted:" in line, line


@pytest.mark.parametrize("path", ["./no-such-model", "no/such/model", "{tmp}"])
def test_from_pretrained_missing_path(tmp_path, path):
    path = path.format(tmp=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no such directory, and not a valid Hub id.*accepted: a local "
                                                r"directory saved by save_pretrained.*'state-spaces/mamba-130m-hf'"):
        gsq_hf.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        gsq_hf.from_pretrained(tmp_path)


# -- output files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, message", [
    ("{tmp}", "is a directory; give a file path, e.g. {tmp}/results.json"),
    ("{tmp}/file.txt/out.json", "{tmp}/file.txt is a file, so no folder can be made there"),
])
def test_unwritable_json_path_is_refused_before_any_config_runs(tmp_path, capsys, target, message):
    (tmp_path / "file.txt").write_text("x")
    line = _error_line(capsys, "--config", "fp32", "--json", target.format(tmp=tmp_path))
    assert "argument --json" in line and message.format(tmp=tmp_path) in line, line


def test_two_configs_of_one_name_are_refused(tmp_path, capsys):
    """Rows and JSON records are keyed by config name: two files both called my.yaml would give two 'my' rows."""
    for folder, fmt in (("a", "int8"), ("b", "int2")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "my.yaml").write_text(f"policy: {{kind: static, format: {fmt}}}\n")
    line = _error_line(capsys, "--config", "fp32", str(tmp_path / "a" / "my.yaml"), str(tmp_path / "b" / "my.yaml"))
    assert "are both named 'my'" in line and str(tmp_path / "b" / "my.yaml") in line, line


def test_plot_into_a_file_is_refused_before_any_config_runs(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    line = _error_line(capsys, "--config", "fp32", "--plot", str(tmp_path / "file.txt"))
    assert "argument --plot" in line and "is a file; give a folder" in line, line
