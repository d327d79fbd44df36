"""The ``gsq_perplexity`` evaluate metric: loads offline from the package, and is decode_faithful_perplexity."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

evaluate = pytest.importorskip("evaluate")

import gsq_hf.metrics  # noqa: E402
from gsq_hf.eval import perplexity  # noqa: E402
from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR, builtin_text  # noqa: E402
from gsq_hf.eval.data import DOCUMENT_SEPARATOR, load_model, load_tokenizer, make_windows  # noqa: E402

TEXTS = [builtin_text("test")[:600], builtin_text("test")[600:1100]]
CONTEXT = 32


@pytest.fixture(scope="module")
def metric():
    """Loaded with the Hub switched off: a local module needs no network."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_EVALUATE_OFFLINE", "1")
    mp.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    try:
        yield gsq_hf.metrics.load()
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def builtin():
    return load_model(BUILTIN_MODEL_DIR), load_tokenizer(BUILTIN_MODEL_DIR)


def test_loads_as_an_evaluate_metric(metric):
    assert isinstance(metric, evaluate.Metric)
    assert list(metric.features) == ["predictions"]
    assert "decode-faithful" in metric.description.lower() or "decode-faithfully" in metric.description
    for name in ("predictions", "model", "config", "context", "batch_size", "bits_per_byte", "word_perplexity"):
        assert name in metric.inputs_description
    again = evaluate.load(str(gsq_hf.metrics.GSQ_PERPLEXITY))  # the plain evaluate way
    assert type(again).__name__ == type(metric).__name__ == "GsqPerplexity"


def test_shares_the_one_implementation(metric):
    module = sys.modules[type(metric).__module__]
    assert module.decode_faithful_perplexity is perplexity.decode_faithful_perplexity


def test_equals_decode_faithful_perplexity(metric, builtin):
    model, tokenizer = builtin
    configs = ["fp32", "int4", "gsq-entropy"]
    results = metric.compute(predictions=TEXTS, model=model, config=configs, context=CONTEXT, batch_size=2)
    windows = make_windows(tokenizer, DOCUMENT_SEPARATOR.join(TEXTS), CONTEXT)
    direct = [perplexity.decode_faithful_perplexity(model, windows, cfg, batch_size=2, progress=False).to_dict()
              for cfg in configs]
    assert results["config"] == configs
    assert results["tokens"] == windows.scored_tokens == direct[0]["tokens"]
    for key in ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "avg_state_bits",
                "state_bytes", "full_precision_state_bytes"):
        assert results[key] == [d[key] for d in direct], key
    assert results["perplexity"][1] != results["perplexity"][0]  # int4 states change the scores


def test_single_config_by_path_with_reference(metric):
    results = metric.compute(predictions=TEXTS, model=str(BUILTIN_MODEL_DIR), config="fp32", context=CONTEXT,
                             max_tokens=2 * CONTEXT, device="cpu", reference=True)
    assert results["config"] == "fp32" and isinstance(results["perplexity"], float)
    assert results["tokens"] == 2 * (CONTEXT - 1)
    assert results["perplexity"] == pytest.approx(results["reference_perplexity"], rel=1e-5)
    builtin = metric.compute(predictions=TEXTS, config="fp32", context=CONTEXT, max_tokens=2 * CONTEXT)
    assert builtin["perplexity"] == results["perplexity"]  # model=None is the built-in model


def test_model_object_without_a_tokenizer_is_refused(metric):
    from models import tiny_mamba

    with pytest.raises(ValueError, match="tokenizer="):
        metric.compute(predictions=TEXTS, model=tiny_mamba(), config="fp32", context=CONTEXT)


def test_packaged():
    """A non-editable install carries the metric: its package and files are in pyproject's lists."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "gsq_hf.metrics" in setuptools["packages"]
    patterns = setuptools["package-data"]["gsq_hf.metrics"]
    root = gsq_hf.metrics.GSQ_PERPLEXITY.parent
    shipped = {p.relative_to(root).as_posix() for pattern in patterns for p in root.glob(pattern)}
    assert {"gsq_perplexity/gsq_perplexity.py", "gsq_perplexity/README.md"} <= shipped
