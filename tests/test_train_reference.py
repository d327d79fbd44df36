"""scripts/train_reference.py end to end on a tiny config: train, resume, reload, training_info.json; the bpe8k
tokenizer (trained, cached, saved, reloaded, round-tripping evaluation text)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from script_loader import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_reference.py"
SHARED_DATA = REPO.parent / "shared" / "data"
NEEDED = [SHARED_DATA / "train-corpus", SHARED_DATA / "tokenizers" / "gpt-neox-20b" / "tokenizer.json",
          SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw", SHARED_DATA / "ptb" / "ptb.test.txt"]

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
    """The GPT-NeoX path (the gpu preset's tokenizer), on the cpu preset's tiny variant."""
    _require_shared_data()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / family
    _run("--family", family, "--output-dir", str(out), "--steps", "4", *TINY, "--tokenizer", "gpt-neox",
         "--wikitext-tokens", "0")
    first = json.loads((out / "training_info.json").read_text())
    assert first["steps"] == 4 and first["wikitext2_test"] is None and (out / "checkpoint" / "checkpoint.pt").exists()
    assert list(out.glob("tokens-*.pt")), "the tokenized corpus is cached in the output dir"

    result = _run("--family", family, "--output-dir", str(out), "--steps", "6", "--resume", *TINY,
                  "--tokenizer", "gpt-neox")
    assert "resumed from step 4" in result.stdout
    assert "tokenized corpus from cache" in result.stdout

    info = json.loads((out / "training_info.json").read_text())
    assert info["model"] == ("MambaForCausalLM" if family == "mamba" else "Mamba2ForCausalLM")
    assert info["steps"] == 6 and len(info["history"]) == 3 and info["tokens_seen"] == 6 * 2 * 64
    assert len(info["train_losses"]) == 6 and info["train_losses"][:4] == first["train_losses"]
    assert info["history"][:2] == first["history"], "resuming keeps the earlier history"
    assert len(info["commands"]) == 2 and "--resume" in info["command"]
    assert info["parameters"] > 50280 * 32 and info["vocab_size"] == 50280
    assert info["tokenizer"]["name"] == "gpt-neox" and info["embedding_parameters"] == 50280 * 32
    assert not list(out.glob("tokenizer-bpe8k-*")), "no BPE is trained for gpt-neox"
    assert set(info["versions"]) >= {"python", "torch", "transformers", "tokenizers"}
    assert info["corpus"]["train_tokens"] > 0 and info["corpus"]["heldout_tokens"] > 0
    wikitext = info["wikitext2_test"]
    assert wikitext["scored_tokens"] == 4 * 63
    assert 1 < wikitext["token_perplexity"] < wikitext["word_perplexity"]
    assert wikitext["scored_bytes"] > wikitext["scored_tokens"] and 0 < wikitext["bits_per_byte"] < 30
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


@pytest.mark.slow
@pytest.mark.data
def test_bpe8k_tokenizer(tmp_path):
    """The cpu preset's default: a byte-level BPE trained on the slice's training articles, cached, saved with the
    model, reloaded with AutoTokenizer; PTB and WikiText-2 lines round-trip exactly; --tokens carries it."""
    _require_shared_data()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, cache = tmp_path / "bpe", tmp_path / "cache"
    result = _run("--family", "mamba2", "--output-dir", str(out), "--cache-dir", str(cache), "--steps", "2", *TINY)
    assert "trained the bpe8k tokenizer" in result.stdout
    info = json.loads((out / "training_info.json").read_text())
    assert info["tokenizer"]["name"] == "bpe8k" and info["tokenizer"]["settings"]["vocab_size"] == 8192
    n_tokens = info["tokenizer"]["vocab_size"]
    assert 1000 < n_tokens <= 8192  # a 100 kB slice has fewer merges to offer than 8192 - 258
    assert info["vocab_size"] == -(-n_tokens // 8) * 8 and info["vocab_size"] % 8 == 0
    assert info["embedding_parameters"] == info["vocab_size"] * 32
    assert info["embedding_share"] == round(info["embedding_parameters"] / info["parameters"], 4)
    assert info["wikitext2_test"]["scored_tokens"] == 4 * 63
    cached = list(cache.glob("tokenizer-bpe8k-*.json"))
    assert len([f for f in cached if not f.name.endswith(".info.json")]) == 1 and list(cache.glob("tokens-*.pt"))

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == n_tokens
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    ptb = (SHARED_DATA / "ptb" / "ptb.test.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    wiki = (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    lines = ptb[:3] + [line for line in wiki if len(line) > 80][:3] + [" = Robert Boulter = \n", "héllo 日本 — ∑ 🙂\t"]
    for line in lines:
        ids = tokenizer.encode(line, add_special_tokens=False)
        assert max(ids) < n_tokens
        assert tokenizer.decode(ids) == line, line
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == info["vocab_size"] and model.config.eos_token_id == 0

    # Deterministic: the same slice trains the same tokenizer (here in-process, as the script does).
    train_reference = load_script("train_reference")
    args = train_reference.parse_args(["--output-dir", str(tmp_path / "x"), "--max-corpus-bytes", "100000"])
    train_docs, _ = train_reference.split_documents(args)
    first, second = (train_reference.train_bpe_tokenizer(train_docs).to_str() for _ in range(2))
    assert first == second == AutoTokenizer.from_pretrained(out).backend_tokenizer.to_str()

    # A second run finds both caches; --tokens alone brings the tokenizer with the ids.
    again = _run("--family", "mamba", "--output-dir", str(tmp_path / "again"), "--cache-dir", str(cache),
                 "--steps", "1", *TINY, "--wikitext-tokens", "0")
    assert "bpe8k tokenizer from cache" in again.stdout and "tokenized corpus from cache" in again.stdout
    tokens = next(cache.glob("tokens-*.pt"))
    moved = _run("--family", "mamba", "--output-dir", str(tmp_path / "moved"), "--tokens", str(tokens),
                 "--data-dir", str(tmp_path / "nothing"), "--steps", "1", *TINY, "--wikitext-tokens", "0")
    assert "tokenized corpus from" in moved.stdout
    assert AutoTokenizer.from_pretrained(tmp_path / "moved").backend_tokenizer.to_str() == first
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    wrong = subprocess.run([sys.executable, str(SCRIPT), "--output-dir", str(tmp_path / "w"), "--tokens", str(tokens),
                            "--tokenizer", "gpt-neox", *TINY], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode != 0 and "holds bpe8k ids" in wrong.stderr
