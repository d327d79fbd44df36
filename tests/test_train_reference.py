"""scripts/train_reference.py end to end on a tiny config: train, resume, reload, training_info.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_reference.py"
SHARED_DATA = REPO.parent / "shared" / "data"
NEEDED = [SHARED_DATA / "train-corpus", SHARED_DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json",
          SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"]

TINY = ["--hidden", "32", "--layers", "1", "--seq-len", "64", "--batch-size", "2", "--max-corpus-bytes", "100000",
        "--eval-every", "2", "--checkpoint-every", "2", "--val-tokens", "256", "--wikitext-tokens", "256",
        "--wikitext-context", "64", "--eval-batch-size", "4", "--threads", "1", "--minutes", "0", "--no-progress"]


def _require_shared_data() -> None:
    missing = [str(p) for p in NEEDED if not p.exists()]
    if missing:
        message = f"public corpora not found ({', '.join(missing)}): the workspace's shared/data folder"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI=true requires them")
        pytest.skip(message)


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_train_resume_reload(family, tmp_path):
    _require_shared_data()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / family
    _run("--family", family, "--output-dir", str(out), "--steps", "4", *TINY, "--wikitext-tokens", "0")
    first = json.loads((out / "training_info.json").read_text())
    assert first["steps"] == 4 and first["wikitext2_test"] is None and (out / "checkpoint" / "checkpoint.pt").exists()
    assert list(out.glob("tokens-*.pt")), "the tokenized corpus is cached in the output dir"

    result = _run("--family", family, "--output-dir", str(out), "--steps", "6", "--resume", *TINY)
    assert "resumed from step 4" in result.stdout
    assert "tokenized corpus from cache" in result.stdout

    info = json.loads((out / "training_info.json").read_text())
    assert info["model"] == ("MambaForCausalLM" if family == "mamba" else "Mamba2ForCausalLM")
    assert info["steps"] == 6 and len(info["history"]) == 3 and info["tokens_seen"] == 6 * 2 * 64
    assert len(info["train_losses"]) == 6 and info["train_losses"][:4] == first["train_losses"]
    assert info["history"][:2] == first["history"], "resuming keeps the earlier history"
    assert len(info["commands"]) == 2 and "--resume" in info["command"]
    assert info["parameters"] > 50280 * 32 and info["vocab_size"] == 50280
    assert set(info["versions"]) >= {"python", "torch", "transformers", "tokenizers"}
    assert info["corpus"]["train_tokens"] > 0 and info["corpus"]["heldout_tokens"] > 0
    wikitext = info["wikitext2_test"]
    assert wikitext["scored_tokens"] == 4 * 63
    assert 1 < wikitext["token_perplexity"] < wikitext["word_perplexity"]
    assert wikitext["published_mamba_130m_wikitext2"]

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == info["model"]
    assert model.config.vocab_size == 50280 and model.config.hidden_size == 32
    assert getattr(model.config, "use_mambapy", False) is False
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    assert tokenizer("Hello world")["input_ids"] == [12092, 1533]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[12092, 1533]])).logits
    assert logits.shape == (1, 2, 50280) and torch.isfinite(logits).all()
