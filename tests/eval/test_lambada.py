"""gsq_hf.eval.lambada: the last word split off, rows independent of their batch, chunked equal to stepped."""

import math

import pytest
import torch

from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR
from gsq_hf.eval.data import load_model, load_tokenizer
from gsq_hf.eval.lambada import is_lambada, lambada_score, lambada_tokens

TEXTS = ["The quick brown fox jumps over the lazy dog", "def f(x): return x", "import os and sys"]


@pytest.fixture(scope="module")
def scored():
    model, tokenizer = load_model(BUILTIN_MODEL_DIR), load_tokenizer(BUILTIN_MODEL_DIR)
    return model, lambada_tokens(tokenizer, TEXTS), tokenizer


def test_the_target_is_the_last_word_with_its_space(scored):
    _, pairs, tokenizer = scored
    assert tokenizer.decode(pairs[0][1]) == " dog" and tokenizer.decode(pairs[0][0]).endswith("lazy")
    assert is_lambada("x/lambada_test.jsonl") and not is_lambada("x/wiki.test.raw")


@pytest.mark.parametrize("config", ["int4", "gsq-entropy"])
def test_rows_do_not_depend_on_their_batch(scored, config):
    model, pairs, _ = scored
    torch.manual_seed(0)
    together = lambada_score(model, pairs, config, batch_size=3)
    alone = [lambada_score(model, [pair], config, batch_size=1) for pair in pairs]
    mean = sum(math.log(a["lambada_perplexity"]) for a in alone) / len(alone)
    assert math.isclose(math.log(together["lambada_perplexity"]), mean, rel_tol=1e-5)
    assert together["lambada_accuracy"] == sum(a["lambada_accuracy"] for a in alone) / len(alone)
    assert together["lambada_evaluation"] == ("stepped" if config == "gsq-entropy" else "chunked")


def test_chunked_equals_stepped_up_to_float_rounding(scored):
    model, pairs, _ = scored
    chunked = lambada_score(model, pairs, "int8", batch_size=2)
    stepped = lambada_score(model, pairs, "int8", batch_size=2, stepped=True)
    assert chunked["lambada_evaluation"] == "chunked" and stepped["lambada_evaluation"] == "stepped"
    assert chunked["lambada_perplexity"] == pytest.approx(stepped["lambada_perplexity"], rel=1e-4)
    assert chunked["lambada_accuracy"] == stepped["lambada_accuracy"] and chunked["lambada_examples"] == 3
