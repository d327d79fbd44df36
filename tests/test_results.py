"""scripts/results.py runs end to end on the built-in model with a small budget (its numbers are not asserted,
only that they exist, are finite and that fp32 is the Δ baseline)."""

import importlib.util
import math
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAMBADA = ROOT.parent / "shared" / "data" / "lambada" / "lambada_test.jsonl"


def load_script():
    spec = importlib.util.spec_from_file_location("results_script", ROOT / "scripts" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(markdown: str, heading: str) -> list[list[str]]:
    """The data rows of the table under ``### heading``."""
    section = markdown.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]  # skip the header


@pytest.mark.slow
def test_results_pipeline(tmp_path):
    script = load_script()
    args = ["--dataset", "builtin", "--max-tokens", "256", "--context", "64", "--lambada-examples", "4",
            "--trace-tokens", "24", "--threads", "1", "--no-progress", "--out", str(tmp_path)]
    with_lambada = LAMBADA.is_file()
    if with_lambada:
        args += ["--dataset", str(LAMBADA)]
    elif os.environ.get("CI") == "true":
        pytest.fail(f"{LAMBADA} is missing on CI")
    payload = script.main(args)

    names = [script.resolve_config(config).name for _, config in script.CONFIGS]
    assert names[0] == "fp32" and len(set(names)) == len(names)
    datasets = ["builtin"] + (["lambada_test"] if with_lambada else [])
    for name in ["results.md", "results.json", "trace-tiny-mamba-pydoc.png",
                 *(f"pareto-tiny-mamba-pydoc-{script.slug(d)}.png" for d in datasets)]:
        assert (tmp_path / name).stat().st_size > 0, name

    markdown = (tmp_path / "results.md").read_text()
    assert "python scripts/results.py" in markdown and "torch" in markdown
    for dataset in datasets:
        rows = table_rows(markdown, f"tiny-mamba-pydoc — {dataset}")
        assert [row[0] for row in rows] == names  # one row per config, in grid order
        fp32 = rows[0]
        assert fp32[-3] == "+0.000%"  # Δ vs fp32 of fp32 itself
        for row in rows:
            numbers = [cell for cell in row[2:] if re.fullmatch(r"[-+]?[\d,]*\.?\d+%?", cell)]
            assert len(numbers) == len(row) - 2, row  # no "-", no FAILED, no nan
            assert all(math.isfinite(float(cell.rstrip("%").replace(",", ""))) for cell in numbers), row

    records = payload["records"]
    assert len(records) == len(names) * len(datasets)
    for record in records:
        assert not record.get("error")
        keys = ["perplexity", "word_perplexity", "avg_state_bits", "state_bytes", "delta_vs_fp32"]
        if record["dataset"] == "lambada_test":
            keys += ["lambada_accuracy", "lambada_perplexity"]
            assert record["lambada_examples"] == 4 and 0.0 <= record["lambada_accuracy"] <= 1.0
        assert all(math.isfinite(record[key]) for key in keys), record
        if record["config"] == "fp32":
            assert record["delta_vs_fp32"] == 0.0
    if not with_lambada:
        pytest.skip(f"LAMBADA part skipped: {LAMBADA} is absent (the built-in part passed)")


def test_lambada_split_and_padding_rows_are_independent():
    """A row's LAMBADA score does not depend on the other rows of its batch (right padding, per-row policies)."""
    import torch

    from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR
    from gsq_hf.eval.data import load_model, load_tokenizer

    script = load_script()
    model, tokenizer = load_model(BUILTIN_MODEL_DIR), load_tokenizer(BUILTIN_MODEL_DIR)
    texts = ["The quick brown fox jumps over the lazy dog", "def f(x): return x"]
    pairs = script.lambada_tokens(tokenizer, texts)
    assert tokenizer.decode(pairs[0][1]).strip() == "dog"
    torch.manual_seed(0)
    for config in ("int4", "gsq-entropy"):
        together = script.lambada_score(model, pairs, config, batch_size=2)
        alone = [script.lambada_score(model, [pair], config, batch_size=1) for pair in pairs]
        mean = sum(math.log(a["lambada_perplexity"]) for a in alone) / 2
        assert math.isclose(math.log(together["lambada_perplexity"]), mean, rel_tol=1e-5)
        assert together["lambada_accuracy"] == sum(a["lambada_accuracy"] for a in alone) / 2
