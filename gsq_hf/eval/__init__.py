"""Evaluation of what a state config costs (perplexity) and saves (memory); ``gsq-hf eval`` / ``gsq-hf memory``.

``memory`` is not imported here: it is also run as ``python -m gsq_hf.eval.memory`` (one process per config).
"""

from .data import DatasetNotFoundError, EvalInputError, ModelNotFoundError, TokenWindows, load_text, make_windows
from .perplexity import NonFiniteLogitsError, PerplexityResult, decode_faithful_perplexity, full_sequence_perplexity

__all__ = [
    "DatasetNotFoundError",
    "EvalInputError",
    "ModelNotFoundError",
    "NonFiniteLogitsError",
    "PerplexityResult",
    "TokenWindows",
    "decode_faithful_perplexity",
    "full_sequence_perplexity",
    "load_text",
    "make_windows",
]
