"""scripts/train_recall.py end to end on a tiny config: train, save, reload, and score what it says it scored."""

from __future__ import annotations

import json

import pytest
import torch
from script_loader import load_script
from transformers import AutoModelForCausalLM

from gsq_hf.eval.recall import generate_mqar, load_recall_spec, recall_accuracy

TINY = ["--device", "cpu", "--hidden", "16", "--layers", "1", "--d-state", "4", "--head-dim", "8", "--chunk-size",
        "8", "--batch", "4", "--eval-every", "2", "--eval-num", "8", "--final-num", "8", "--pairs", "2", "--queries",
        "2", "--gap", "3", "--keys", "8", "--values", "8", "--filler", "4"]


@pytest.fixture(scope="module")
def script():
    return load_script("train_recall")


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_train_save_reload_and_rescore(script, family, tmp_path):
    out = tmp_path / family
    with torch.enable_grad():  # tests/conftest.py runs every test under no_grad
        info = script.main(["--family", family, "--output-dir", str(out), "--steps", "4", "--curriculum", "1",
                            "--advance-at", "0", "--gap-min", "1", *TINY])
    saved = json.loads((out / "recall_model.json").read_text())
    assert saved == json.loads(json.dumps(info))
    assert saved["status"] == "done" and saved["steps"] == 4 and saved["stopped_by"] == "steps"
    assert saved["training"]["curriculum"] == [1, 2] and saved["training"]["gap_range"] == [1, 3]
    assert saved["command"].startswith("python scripts/train_recall.py --family " + family)
    assert {"python", "torch", "transformers", "gsq_hf"} <= set(saved["versions"])
    assert set(saved["fast_recall_by_gap"]) == {"3", "12", "48"}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == saved["model_class"] and getattr(model.config, "use_mambapy", False) is False
    assert sum(p.numel() for p in model.parameters()) == saved["parameters"]
    spec = load_recall_spec(out)  # the task, rebuilt from the model directory
    result = recall_accuracy(model, generate_mqar(spec, 8, seed=0), "fp32")
    assert result["accuracy"] == saved["recall_fp32"] and result["queries"] == saved["final"]["queries"] == 16


def test_time_budget_of_zero_still_writes_a_model_and_its_json(script, tmp_path):
    """A run cut short by its budget (or SIGTERM) still saves, scores and describes what it has."""
    out = tmp_path / "cut"
    with torch.enable_grad():
        script.main(["--family", "mamba2", "--output-dir", str(out), "--minutes", "0", *TINY])
    saved = json.loads((out / "recall_model.json").read_text())
    assert saved["stopped_by"] == "minutes" and saved["steps"] == 0 and saved["recall_fp32"] is not None


def test_out_of_memory_retries_the_step_in_micro_batches(script, monkeypatch):
    """Runs sharing one GPU may run out of memory: the step is redone in halves, with the same gradient."""
    from models import tiny_mamba2

    from gsq_hf.eval.recall import MQARSpec

    spec = MQARSpec(pairs=2, gap=3, queries=2, keys=8, values=8, filler=4)
    batch = generate_mqar(spec, 8, seed=0)
    args = script.parse_args(["--output-dir", "unused", "--device", "cpu"])
    whole, split = tiny_mamba2().train(), tiny_mamba2().train()
    with torch.enable_grad():
        loss, parts = script.train_step(whole, torch.optim.SGD(whole.parameters(), lr=0.1), batch, args, False, 1)
        real = script.answer_loss

        def small_only(model, ids, mask, bf16):
            if ids.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real(model, ids, mask, bf16)

        monkeypatch.setattr(script, "answer_loss", small_only)
        loss4, parts4 = script.train_step(split, torch.optim.SGD(split.parameters(), lr=0.1), batch, args, False, 1)
    assert (parts, parts4) == (1, 4) and loss4 == pytest.approx(loss, rel=1e-5)
    for a, b in zip(whole.parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
