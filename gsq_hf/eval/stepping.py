"""Feeding token windows through a patched model with the states stored as in generation: one helper for
every evaluation (perplexity, recall), in either of two modes.

* chunked: multi-token forwards; with ``write_mode="every_step"`` the patched scan stores and re-reads the
  state after every token inside a forward, as stepping does (equal up to float rounding, which can flip a
  code on a rounding boundary), at one forward per chunk instead of one per token;
* stepped: one token per forward, as ``generate`` feeds them: needed where the policy's signal is the
  next-token distribution (entropy: inside a forward there is none) or the state is written only at the end of
  a forward (``end_of_forward``).
"""

from __future__ import annotations

import torch
from transformers import Cache

from ..cache import GSQCache
from ..config import GSQConfig
from ..signals import reads_logits

__all__ = ["CHUNK_LOGITS", "needs_stepping", "next_token_logits"]

# A chunk's logits stay under this many values (float32: 256 MiB), however large the batch or the vocabulary.
CHUNK_LOGITS = 2**26


def needs_stepping(model: torch.nn.Module, cfg: GSQConfig, stepped: bool | None) -> bool:
    """Whether a run of ``cfg`` on ``model`` must feed one token per forward: where a multi-token forward would
    store the states differently from generation (no next-token signal inside it, or states written only at
    its end). Judged on the config as it applies to the model (its ``family_overrides``)."""
    if stepped not in (None, True, False):
        raise ValueError(f"stepped must be None (step only where needed), True or False, got {stepped!r}")
    cfg = cfg.for_model_type(getattr(model.config, "model_type", None))
    reason = ("its policy reads the next-token distribution, which a multi-token forward does not have"
              if reads_logits(cfg.build_policy()) else
              "write_mode='end_of_forward' stores the state only at the end of a forward"
              if cfg.write_mode != "every_step" else None)
    if stepped is False and reason is not None:
        raise ValueError(f"config {cfg.name!r} cannot be evaluated by chunked forwards: {reason}; "
                         "use stepped=None or True")
    return bool(stepped) or reason is not None


def next_token_logits(model: torch.nn.Module, ids: torch.Tensor, cache: GSQCache | Cache, stepped: bool):
    """``(t, logits)`` per forward over ``ids`` (rows, length), continuing from ``cache``: the float32 logits
    after tokens ``t .. t+n-1`` (the next-token distributions there) as (n, rows, vocab); one token per
    forward when ``stepped``, else chunks of at most `CHUNK_LOGITS` values. ``cache`` is a `GSQCache`, or a
    transformers cache (``DynamicCache(config=model.config)``) to step an unpatched model."""
    rows, length = ids.shape
    vocab = getattr(model.config, "vocab_size", None) or 1
    chunk = 1 if stepped else max(1, min(length, CHUNK_LOGITS // (rows * vocab)))
    for t in range(0, length, chunk):
        n = min(chunk, length - t)
        logits = model(input_ids=ids[:, t : t + n], cache=cache, use_cache=True).logits
        yield t, logits.float().transpose(0, 1)
