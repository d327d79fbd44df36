"""``gsq-hf sweep``: the payload it writes, the counter on stderr, one-line errors, Ctrl-C keeps what finished."""

import json

import pytest
from tables import parse_table

import gsq_hf.eval.sweep as sweep
from gsq_hf.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, main

SMALL = ["sweep", "--context", "32", "--max-tokens", "64", "--families", "uniform-sr", "--long-stream-tokens", "0",
         "--recall-num", "0", "--kl-top-k", "8", "--threads", "1"]


def test_sweep_writes_the_payload_and_prints_one_row_per_config(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert main([*SMALL, "--json", str(out)]) == 0
    captured = capsys.readouterr()
    payload = json.loads(out.read_text())
    assert payload["status"] == "complete" and payload["configs"] == ["fp32", "int4-sr", "int3-sr"]
    assert payload["options"]["context"] == 32 and payload["threads"] == 1 and payload["long_stream"] == []
    rows = parse_table(captured.out)
    assert [row["config"] for row in rows] == payload["configs"]
    for row, record in zip(rows, payload["records"], strict=True):
        assert float(row["perplexity"]) == pytest.approx(record["perplexity"], abs=1e-4)
        assert row["evaluation"] == record["evaluation"] == "chunked"
    assert "config 1 of 3: tiny-mamba-pydoc / builtin / fp32" in captured.err
    assert "config 3 of 3: tiny-mamba-pydoc / builtin / int3-sr" in captured.err


@pytest.mark.parametrize("args, message", [
    (["--families", "nope"], "unknown families 'nope'; known: uniform, uniform-sr"),
    (["--model", "/no/such/model"], "/no/such/model"),
    (["--dataset", "/no/such/text.txt"], "dataset path '/no/such/text.txt' does not exist"),
    (["--recall-only", "--recall-num", "0"], "--recall-only with --recall-num 0 leaves nothing to run"),
    (["--kl-top-k", "-1"], "must be 0 or a positive integer"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main([*SMALL, *args]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_ctrl_c_keeps_the_finished_configs(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep.json"
    evaluate = sweep.decode_faithful_perplexity

    def interrupt_third(model, windows, config, **options):
        if config.name == "int3-sr":
            raise KeyboardInterrupt
        return evaluate(model, windows, config, **options)

    monkeypatch.setattr(sweep, "decode_faithful_perplexity", interrupt_third)
    assert main([*SMALL, "--json", str(out)]) == EXIT_INTERRUPTED
    captured = capsys.readouterr()
    payload = json.loads(out.read_text())
    assert payload["status"] == "interrupted" and [r["config"] for r in payload["records"]] == ["fp32", "int4-sr"]
    assert [row["config"] for row in parse_table(captured.out)] == ["fp32", "int4-sr"]
    assert captured.err.strip().splitlines()[-1] == (f"gsq-hf sweep: interrupted after 2 of 3 configs; {out} holds "
                                                     "the finished ones")
