"""Evaluation of what a state config costs (perplexity, associative recall) and saves (memory).

``gsq-hf eval`` / ``gsq-hf recall`` / ``gsq-hf memory`` / ``gsq-hf sweep`` (`gsq_hf.eval.sweep`: the config grid
over models, datasets, LAMBADA, long streams and recall, with the verdicts of `gsq_hf.eval.verdict`).

``memory`` is not imported here: it is also run as ``python -m gsq_hf.eval.memory`` (one process per config).
"""

from .data import DatasetNotFoundError, EvalInputError, ModelNotFoundError, TokenWindows, load_text, make_windows
from .perplexity import (
    NonFiniteLogitsError,
    PerplexityResult,
    ReferenceTopK,
    decode_faithful_perplexity,
    full_sequence_perplexity,
)
from .recall import MQARSpec, RecallInputError, generate_mqar, recall_accuracy, recall_sweep

__all__ = [
    "DatasetNotFoundError",
    "EvalInputError",
    "MQARSpec",
    "ModelNotFoundError",
    "NonFiniteLogitsError",
    "PerplexityResult",
    "RecallInputError",
    "ReferenceTopK",
    "TokenWindows",
    "decode_faithful_perplexity",
    "full_sequence_perplexity",
    "generate_mqar",
    "load_text",
    "make_windows",
    "recall_accuracy",
    "recall_sweep",
]
