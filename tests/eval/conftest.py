"""Fixtures of the evaluation tests: an in-memory tokenizer and text, offline Hub, the shared corpora.

The tiny models come from ``tests/models.py`` (``model`` is parametrized over the families by
``tests/conftest.py``); the real corpora come from ``../shared/data`` through `shared_data`, which skips
where that folder is absent and fails where ``CI=true``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from evalkit import word_text, word_tokenizer
from transformers import PreTrainedTokenizerFast

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer()


@pytest.fixture(scope="session")
def text() -> str:
    return word_text(600)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (public corpora and tokenizers): skipped where absent, a failure where ``CI=true``."""
    if not SHARED_DATA.is_dir():
        message = f"public corpora not found at {SHARED_DATA} (the workspace's shared/data folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI=true requires them")
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture
def offline_hub(monkeypatch):
    """Hub access fails at once, as with no network but without huggingface_hub's ~25 s of retries."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
