"""``gsq-hf eval`` / ``gsq-hf memory``: the JSON contract, exit codes, one-line errors for every bad input."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch
from models import tiny_mamba
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from gsq_hf.cli import DEFAULT_CONFIGS, main

WORDS = [f"w{i}" for i in range(60)]
STATE_BYTES = 2 * (64 * 8 * 4 + 64 * 4 * 4)  # per sequence, fp32: 2 layers x (SSM 64x8 + conv 64x4)
EVAL_KEYS = {"config", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "tokens",
             "avg_state_bits", "state_bytes", "full_precision_state_bytes", "tokens_per_second", "delta_vs_reference"}


def _save(model, directory):
    """Save ``model`` and a whitespace word-level tokenizer (ids 0..60, as in tests/eval/evalkit.py)."""
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.save_pretrained(directory)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _save(tiny_mamba(), tmp_path_factory.mktemp("tiny-mamba"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "words.txt"
    rng = random.Random(0)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(300)))
    return str(path)


@pytest.fixture
def offline_hub(monkeypatch):
    """Hub access fails at once, as with no network but without huggingface_hub's ~25 s of retries."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


# -- results ------------------------------------------------------------------------------------------------
def test_eval_json_contract(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = main(["eval", "--model", model_dir, "--dataset", text_file, "--context", "16", "--max-tokens", "64",
                 "--config", "fp32", "int8", "--config", "gsq-entropy", "--json", str(out), "--quiet"])
    assert code == 0
    data = json.loads(out.read_text())
    assert {"model", "dataset", "split", "context", "versions", "results"} <= set(data)
    assert (data["model"], data["dataset"], data["split"], data["context"]) == (model_dir, text_file, "test", 16)
    assert set(data["versions"]) == {"python", "torch", "transformers", "gsq_hf"}
    results = data["results"]
    assert [r["config"] for r in results] == ["fp32", "int8", "gsq-entropy"]
    for record in results:
        assert EVAL_KEYS <= set(record)
        assert record["tokens"] == 4 * 15  # the same windows for every config
        assert record["full_precision_state_bytes"] == STATE_BYTES  # per sequence, not per batch
    assert results[0]["delta_vs_reference"] == 0.0 and results[0]["state_bytes"] == STATE_BYTES
    assert results[1]["state_bytes"] < STATE_BYTES and results[1]["avg_state_bits"] == 12.0
    assert data["reference"]["perplexity"] == pytest.approx(results[0]["perplexity"], rel=1e-6)
    assert "kl_divergence" not in results[0]  # the first config is the KL reference
    for record in results[1:]:
        assert record["kl_divergence"] >= 0 and 0 <= record["top1_agreement"] <= 1 and record["kl_stderr"] >= 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[2:5]] == ["fp32", "int8", "gsq-entropy"]
    assert table[5].startswith("reference (unpatched model")


def test_eval_kl_is_the_library_kl_and_can_be_switched_off(model_dir, text_file, tmp_path):
    """--kl-top-k K scores later configs against the first one's top K logits (K past the vocabulary: all)."""
    from gsq_hf.eval import decode_faithful_perplexity, make_windows
    from gsq_hf.eval.data import load_model, load_tokenizer

    runs = {}
    for k in ("0", "3", "1000"):
        out = tmp_path / f"kl{k}.json"
        assert main(["eval", "--model", model_dir, "--dataset", text_file, "--context", "16", "--max-tokens", "64",
                     "--config", "fp32", "int2", "--kl-top-k", k, "--no-reference", "--json", str(out),
                     "--quiet"]) == 0
        runs[k] = json.loads(out.read_text())["results"][1]
    assert "kl_divergence" not in runs["0"] and "top1_agreement" not in runs["0"]
    model, windows = load_model(model_dir), make_windows(load_tokenizer(model_dir), open(text_file).read(), 16, 64)
    for k, top_k in (("3", 3), ("1000", model.config.vocab_size)):
        fp32 = decode_faithful_perplexity(model, windows, "fp32", keep_reference=top_k, progress=False)
        int2 = decode_faithful_perplexity(model, windows, "int2", reference=fp32.reference, progress=False)
        assert runs[k]["kl_divergence"] == pytest.approx(int2.kl_divergence, rel=1e-12) and int2.kl_divergence > 0
        assert runs[k]["top1_agreement"] == int2.top1_agreement
    assert runs["3"]["kl_divergence"] <= runs["1000"]["kl_divergence"]


@pytest.mark.filterwarnings("ignore:gsq_hf. non-finite SSM state:RuntimeWarning")
def test_nonfinite_config_fails_the_run_but_not_the_table(tmp_path, text_file, capsys):
    model = tiny_mamba()
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")  # every position's logit of token 5 is NaN
    out = tmp_path / "nan.json"
    code = main(["eval", "--model", _save(model, tmp_path / "nan-model"), "--dataset", text_file, "--context", "16",
                 "--max-tokens", "32", "--config", "int8", "--json", str(out), "--quiet"])
    assert code == 1
    assert "FAILED" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert "NaN/Inf next-token logits" in data["results"][0]["error"]
    assert EVAL_KEYS <= set(data["results"][0]) and data["results"][0]["perplexity"] is None
    assert "error" in data["reference"]


def test_builtin_default(tmp_path, capsys):
    builtin = pytest.importorskip("gsq_hf.eval.builtin", reason="gsq_hf/eval/builtin.py is not written yet")
    if not builtin.BUILTIN_MODEL_DIR.is_dir():
        pytest.skip(f"the built-in model is not trained yet ({builtin.BUILTIN_MODEL_DIR} is missing)")
    out = tmp_path / "builtin.json"
    assert main(["eval", "--max-tokens", "256", "--context", "128", "--quiet", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["config"] for r in data["results"]] == list(DEFAULT_CONFIGS)
    assert data["dataset"] == "builtin" and data["model"] == str(builtin.BUILTIN_MODEL_DIR)
    fp32 = data["results"][0]["perplexity"]
    assert fp32 == pytest.approx(data["reference"]["perplexity"], rel=1e-5)
    assert fp32 < 1000  # a trained model, far from a uniform guess over its 2048-token vocabulary


def test_memory_command(model_dir, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the worker processes, as tests/conftest.py does here
    out = tmp_path / "memory.json"
    code = main(["memory", "--model", model_dir, "--dataset", text_file, "--config", "int8", "--batch-size", "2",
                 "--new-tokens", "4", "--prompt-tokens", "8", "--json", str(out), "--quiet"])
    assert code == 0, capsys.readouterr()
    data = json.loads(out.read_text())
    unpatched, int8 = data["results"]
    assert (unpatched["config"], int8["config"]) == ("unpatched", "int8")
    assert unpatched["state_bytes"] == STATE_BYTES and int8["state_bytes"] < STATE_BYTES
    assert unpatched["generated_tokens"] == int8["generated_tokens"] == 2 * 4
    assert all(r["peak_rss_bytes"] > 0 for r in data["results"])


# -- bad input: exit code 2, one line on stderr, no traceback --------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    config = GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    return _save(GPT2LMHeadModel(config), tmp_path_factory.mktemp("gpt2"))


def _bad_inputs(model_dir, text_file, gpt2_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    jsonl = tmp_path / "notext.jsonl"
    jsonl.write_text('{"body": "w1"}\n')
    cases = [
        (["--config", "nope"], "unknown preset 'nope'; known presets: bf16"),
        (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["--model", str(tmp_path / "no-model")], "is not a model directory; accepted: a local directory"),
        (["--model", str(tmp_path)], "could not load model"),
        (["--model", "no-org/no-such-model"], "could not load model 'no-org/no-such-model' as a Hub model id"),
        (["--model", gpt2_dir], "has no Mamba-family mixer gsq_hf can patch"),
        (["--dataset", str(tmp_path / "missing.txt")], "does not exist; accepted: 'builtin'"),
        (["--dataset", "wikitext:wikitext-2-raw-v1"], "could not load Hub dataset 'wikitext:wikitext-2-raw-v1'"),
        (["--dataset", str(empty)], "the evaluation text is empty"),
        (["--dataset", str(jsonl)], 'has no string "text" field'),
        (["--context", "5000"], "context 5000 is longer than the text's 300 tokens"),
        (["--context", "0"], "argument --context: must be a positive integer"),
        (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
        (["--device", "banana"], "device 'banana' is not a torch device"),
        (["--kl-top-k", "-1"], "--kl-top-k must be 0 (off) or a positive number of logits, got -1"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "torch sees no CUDA device"))
    defaults = {"--model": model_dir, "--dataset": text_file, "--context": "16"}
    return [([*args, *(x for k, v in defaults.items() if k not in args for x in (k, v)), "--quiet"], message)
            for args, message in cases]


def test_every_bad_input_is_one_line_and_exit_2(model_dir, text_file, gpt2_dir, tmp_path, offline_hub, capsys):
    for args, message in _bad_inputs(model_dir, text_file, gpt2_dir, tmp_path):
        code = main(["eval", *args])
        captured = capsys.readouterr()
        assert code == 2, (args, captured.err)
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1, (args, captured.err)
        assert message in lines[0] and lines[0].startswith("gsq-hf"), (args, lines[0])
        assert "Traceback" not in captured.err and captured.out == ""


def test_memory_bad_input(capsys):
    assert main(["memory", "--model", "/no/such/model", "--quiet"]) == 2
    assert "is not a model directory" in capsys.readouterr().err


def test_errors_without_quiet_are_still_one_line(model_dir, capsys):
    assert main(["eval", "--model", model_dir, "--dataset", "no/such/file.txt"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(model_dir, capsys):
    assert main(["eval", "--model", model_dir, "--dataset", "missing.txt", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("gsq-hf eval: error: dataset path")


def test_console_script_exit_code(tmp_path):
    """The installed entry point, in a real process: exit status 2 and a single stderr line."""
    command = [shutil.which("gsq-hf")] if shutil.which("gsq-hf") else [sys.executable, "-m", "gsq_hf.cli"]
    done = subprocess.run([*command, "eval", "--model", str(tmp_path / "nope"), "--quiet"], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "is not a model directory" in done.stderr
