"""An in-memory word-level tokenizer and text for the evaluation tests (tiny models: ``tests/models.py``)."""

from __future__ import annotations

import random

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(60)]  # token ids 1..60 ([UNK] = 0) fit the tiny models' vocabulary of 64


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: one token per word, decoding joins tokens with single spaces."""
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def word_text(words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))
