"""``gsq-hf eval`` / ``gsq-hf memory``: the JSON contract, exit codes, one-line errors for every bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import tiny_mamba
from tables import parse_table
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from gsq_hf.cli import DEFAULT_CONFIGS, EXIT_INTERRUPTED, main

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
                 "--config", "fp32", "int8", "--config", "gsq-entropy", "--json", str(out)])  # legend: not --quiet
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
    assert data["status"] == "complete" and data["configs"] == ["fp32", "int8", "gsq-entropy"]
    out = capsys.readouterr().out
    rows = parse_table(out)
    assert [row["config"].rstrip(" *") for row in rows] == ["fp32", "int8", "gsq-entropy"]
    for row, record in zip(rows, results, strict=True):  # the table shows the records' numbers
        assert row["ppl"] == f"{record['perplexity']:.4f}" and row["alloc B/seq"] == f"{record['state_bytes']:,.0f}"
        assert row["bits moved/elem"] == f"{record['avg_state_bits']:.2f}"
        assert row["alloc bits/elem"] == f"{32 * record['ssm_state_bytes'] / 4096:.2f}"  # fp32 SSM: 4096 B
    assert [row["KL vs first"] for row in rows[1:]] == [f"{r['kl_divergence']:.2e}" for r in results[1:]]
    assert rows[2]["config"] == "gsq-entropy *"  # a slot for every unit: allocates more than it moves
    assert "\ncolumns (Δ, KL and top-1 compare each row with the first, fp32):\n" in out and "top-64" in out
    assert "\nreference (unpatched model, one full-sequence forward per window): ppl" in out


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
                 "--max-tokens", "32", "--config", "int8", "--json", str(out), "--quiet",
                 "--plot", str(tmp_path / "p")])
    assert code == 1
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "\nint8: NaN/Inf next-token logits" in printed and "int8: int8:" not in printed
    assert not (tmp_path / "p" / "pareto.png").exists()  # no config scored: no empty plot
    data = json.loads(out.read_text())
    assert data["status"] == "complete" and data["failed_configs"] == ["int8"]
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
                 "--new-tokens", "4", "--prompt-tokens", "8", "--json", str(out), "--quiet", "--threads", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured
    data = json.loads(out.read_text())
    unpatched, int8, again = data["results"]
    assert (unpatched["config"], int8["config"], again["config"], again["repeat"]) == (
        "unpatched", "int8", "unpatched", True)  # the baseline measured again last: the run-to-run spread
    assert unpatched["state_bytes"] == again["state_bytes"] == STATE_BYTES and int8["state_bytes"] < STATE_BYTES
    assert unpatched["generated_tokens"] == int8["generated_tokens"] == 2 * 4
    assert all(r["peak_rss_bytes"] > 0 for r in data["results"])
    assert [r["threads"] for r in data["results"]] == [2, 2, 2]  # --threads reaches every process
    spread = max(abs(unpatched["peak_rss_bytes"] - again["peak_rss_bytes"]), 4096)
    assert data["resolution_bytes"] == {"peak_rss_bytes": spread, "peak_cuda_bytes": None}
    rows = {row["config"]: row for row in parse_table(captured.out)}
    assert rows["int8"]["state B/seq"] == f"{int8['state_bytes']:,.0f}"
    assert rows["int8"]["Δ state x2 KiB"] == f"{2 * (int8['state_bytes'] - STATE_BYTES) / 1024:+,.1f}"
    assert rows["int8"]["resolved"] == ("yes" if 2 * (STATE_BYTES - int8["state_bytes"]) > spread else "no")
    assert f"resolution: {spread / 1024:,.1f} KiB of peak RSS" in captured.out


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
    assert main(["memory", "--prompt-tokens", "100000", "--quiet"]) == 2  # named as the option, not a "context"
    assert "--prompt-tokens 100000 is longer than the text's" in capsys.readouterr().err


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


# -- long runs: progress, results kept as configs finish, Ctrl-C, threads, --version ----------------------
def test_eval_says_which_config_runs_and_keeps_finished_configs_on_ctrl_c(model_dir, text_file, tmp_path, capsys,
                                                                          monkeypatch):
    """Ctrl-C in the 2nd config: the JSON already held the 1st; the table and the JSON keep it, exit 130."""
    import gsq_hf.eval.perplexity as perplexity

    out = tmp_path / "results.json"
    seen = []
    evaluate = perplexity.decode_faithful_perplexity

    def interrupt_second(model, windows, config, **options):
        seen.append(json.loads(out.read_text()) if seen else None)  # the file as the 2nd config starts
        if seen[1:]:
            raise KeyboardInterrupt
        return evaluate(model, windows, config, **options)

    monkeypatch.setattr(perplexity, "decode_faithful_perplexity", interrupt_second)
    code = main(["eval", "--model", model_dir, "--dataset", text_file, "--context", "16", "--max-tokens", "64",
                 "--config", "fp32", "int8", "int4", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == EXIT_INTERRUPTED == 130
    assert [r["config"] for r in seen[1]["results"]] == ["fp32"] and seen[1]["status"] == "partial"
    data = json.loads(out.read_text())
    assert data["status"] == "interrupted" and [r["config"] for r in data["results"]] == ["fp32"]
    assert data["results"][0]["perplexity"] == seen[1]["results"][0]["perplexity"] > 0
    assert data["configs"] == ["fp32", "int8", "int4"]
    assert [row["config"] for row in parse_table(captured.out)] == ["fp32"]
    assert "config 1 of 3: fp32" in captured.err and "config 2 of 3: int8" in captured.err
    assert "config 3 of 3" not in captured.err and "Traceback" not in captured.err
    assert captured.err.strip().splitlines()[-1] == (f"gsq-hf eval: interrupted after 1 of 3 configs; {out} holds "
                                                     "the finished ones")


def test_quiet_hides_the_config_counter_and_the_legend(model_dir, text_file, capsys):
    args = ["eval", "--model", model_dir, "--dataset", text_file, "--context", "16", "--max-tokens", "32",
            "--config", "fp32", "--no-reference"]
    assert main([*args, "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and "columns (" not in quiet.out and quiet.out.splitlines()[0].startswith("config")
    assert main(args) == 0
    assert "columns (" in capsys.readouterr().out


def test_recall_counter_and_ctrl_c(tmp_path, capsys, monkeypatch):
    """Configs run one at a time, each delta still against the first config (the trained recall model: int2
    loses recall); Ctrl-C in the 2nd keeps the 1st."""
    import gsq_hf
    import gsq_hf.eval.recall as recall

    out = tmp_path / "recall.json"
    args = ["recall", "--model", str(Path(gsq_hf.__file__).parent / "assets" / "recall-mamba"), "--config", "fp32",
            "int2", "--gap", "32", "--num", "8", "--json", str(out)]
    assert main(args) == 0
    fp32, int2 = json.loads(out.read_text())["results"]
    assert int2["recall"] < fp32["recall"] and int2["delta_vs_first"] == pytest.approx(int2["recall"] - fp32["recall"])
    assert int2["delta_by_gap"]["32"] == pytest.approx(int2["recall_by_gap"]["32"] - fp32["recall_by_gap"]["32"])
    assert "config 2 of 2: int2" in capsys.readouterr().err
    accuracy = recall.recall_accuracy

    def interrupt_int2(model, batch, cfg, **options):
        if cfg.name == "int2":
            raise KeyboardInterrupt
        return accuracy(model, batch, cfg, **options)

    monkeypatch.setattr(recall, "recall_accuracy", interrupt_int2)
    assert main(args) == EXIT_INTERRUPTED
    data = json.loads(out.read_text())
    assert data["status"] == "interrupted" and [(r["config"], r["correct"]) for r in data["results"]] == [
        ("fp32", fp32["correct"])]
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("gsq-hf recall: interrupted after 1 of 2")


def test_threads(model_dir, text_file, tmp_path, monkeypatch):
    """--threads N sets torch's intra-op threads; the default is 1 for a small model, else up to 4 cores."""
    from gsq_hf.eval.data import default_threads

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # this test process keeps its threads
    for extra, threads in ([], 1), (["--threads", "3"], 3):
        out = tmp_path / "threads.json"
        assert main(["eval", "--model", model_dir, "--dataset", text_file, "--context", "16", "--max-tokens", "32",
                     "--config", "fp32", "--no-reference", "--quiet", "--json", str(out), *extra]) == 0
        assert calls[-1] == threads and json.loads(out.read_text())["threads"] == threads
    model = tiny_mamba()
    assert default_threads(model) == 1
    monkeypatch.setattr("gsq_hf.eval.data.SMALL_MODEL_PARAMETERS", sum(p.numel() for p in model.parameters()))
    assert default_threads(model) == min(len(os.sched_getaffinity(0)), 4)
    assert main(["eval", "--threads", "0"]) == 2


def test_version(capsys):
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"gsq-hf {version('gsq_hf')}\n"
