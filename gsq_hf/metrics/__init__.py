"""`evaluate` metrics shipped with gsq_hf (loadable offline: they live inside the package).

    import gsq_hf.metrics
    metric = gsq_hf.metrics.load()                       # == evaluate.load(str(gsq_hf.metrics.GSQ_PERPLEXITY))
    metric.compute(predictions=texts, model=model, config=["fp32", "int4"], context=256)

``gsq_perplexity`` is `gsq_hf.eval.perplexity.decode_faithful_perplexity` behind the `evaluate.Metric`
interface (the same function, not a copy); see ``gsq_perplexity/README.md`` for its inputs and outputs.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["GSQ_PERPLEXITY", "load"]

GSQ_PERPLEXITY: Path = Path(__file__).resolve().parent / "gsq_perplexity"


def load(**kwargs):
    """The ``gsq_perplexity`` `evaluate.Metric` (``kwargs`` go to `evaluate.load`, e.g. ``experiment_id``)."""
    try:
        import evaluate
    except ImportError as error:
        raise ImportError('gsq_hf.metrics needs the evaluate library: pip install "gsq_hf[metric]"') from error
    return evaluate.load(str(GSQ_PERPLEXITY), **kwargs)
