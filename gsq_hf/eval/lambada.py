"""LAMBADA last-word accuracy and perplexity, decode-faithfully (every state write through the config).

Context = the passage but its last word; the target = the last word with its leading space, tokenized on its
own as lm-evaluation-harness does. Accuracy: every target token is the greedy argmax; perplexity: exp(mean NLL
per last word), as lm-evaluation-harness reports it (and per target token, ``lambada_token_perplexity``).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..cache import GSQCache
from ..config import GSQConfig, resolve_config
from ..patch import is_patched, patched
from .perplexity import NonFiniteLogitsError, _device
from .stepping import needs_stepping, next_token_logits

__all__ = ["is_lambada", "lambada_examples", "lambada_score", "lambada_tokens"]


def is_lambada(source: str) -> bool:
    """A LAMBADA JSONL: a ``.jsonl`` file whose name starts with ``lambada``."""
    path = Path(source)
    return path.suffix == ".jsonl" and path.name.lower().startswith("lambada")


def lambada_examples(path: str | Path, limit: int | None) -> list[str]:
    """The ``text`` of the first ``limit`` (None: all) examples of a LAMBADA JSONL."""
    texts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            texts.append(json.loads(line)["text"])
            if limit is not None and len(texts) >= limit:
                break
    return texts


def lambada_tokens(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """(context ids, last-word ids) per example."""
    pairs = []
    for text in texts:
        context, word = text.rstrip().rsplit(" ", 1)
        pairs.append((tokenizer.encode(context, add_special_tokens=False),
                      tokenizer.encode(" " + word, add_special_tokens=False)))
    return pairs


@torch.inference_mode()
def lambada_score(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]],
                  config: GSQConfig | str | dict, batch_size: int = 8, pad_id: int = 0,
                  stepped: bool | None = None) -> dict[str, Any]:
    """Last-word accuracy and perplexity of ``pairs`` (`lambada_tokens`). Each batch of examples (left-aligned,
    padded on the right) runs through a fresh `GSQCache`, chunked or token by token as
    `gsq_hf.eval.stepping` chooses (``lambada_evaluation``); every policy decides per row and padding only
    follows a row's last scored token, so a row's score does not depend on the others."""
    cfg = resolve_config(config)
    stepped = needs_stepping(model, cfg, stepped)
    device = _device(model)
    correct, nlls, target_tokens = 0, [], 0
    start = time.perf_counter()
    with contextlib.nullcontext() if is_patched(model) else patched(model, cfg):
        for first in range(0, len(pairs), batch_size):
            batch = pairs[first:first + batch_size]
            rows = [ctx + tgt for ctx, tgt in batch]
            ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.int64)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(row)
            ids = ids.to(device)
            begin = torch.tensor([len(ctx) for ctx, _ in batch], device=device)  # first target position
            end = torch.tensor([len(r) for r in rows], device=device)
            nll = torch.zeros(len(rows), dtype=torch.float64, device=device)
            exact = torch.ones(len(rows), dtype=torch.bool, device=device)
            for t, logits in next_token_logits(model, ids[:, : int(end.max()) - 1], GSQCache(model, cfg), stepped):
                n = logits.shape[0]  # predicts positions t+1 .. t+n
                position = torch.arange(t + 1, t + 1 + n, device=device)[:, None]
                scored = (begin <= position) & (position < end)  # (n, rows)
                target = ids[:, t + 1 : t + 1 + n].T
                step = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(n, -1)
                nll += torch.where(scored, step.double(), 0.0).sum(dim=0)
                exact &= (~scored | (logits.argmax(dim=-1) == target)).all(dim=0)
            if not bool(torch.isfinite(nll).all()):
                raise NonFiniteLogitsError(f"{cfg.name}: NaN/Inf logits on LAMBADA examples {first}..")
            correct += int(exact.sum())
            nlls.extend(nll.tolist())
            target_tokens += sum(len(tgt) for _, tgt in batch)
    return {"lambada_accuracy": correct / len(pairs), "lambada_perplexity": math.exp(sum(nlls) / len(nlls)),
            "lambada_token_perplexity": math.exp(sum(nlls) / target_tokens), "lambada_examples": len(pairs),
            "lambada_evaluation": "stepped" if stepped else "chunked", "lambada_seconds": time.perf_counter() - start}
