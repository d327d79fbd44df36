"""Multi-query associative recall (MQAR): an instrument where the recurrent state *is* the answer.

A sequence holds ``pairs`` key–value pairs, then ``gap`` filler tokens, then ``queries`` queries; each query is a
key seen earlier followed by its value. A model answers a query only from what its state kept across the filler,
so recall accuracy measures state fidelity directly (perplexity of small LMs barely reacts to state quantization).
During the filler a trained model's gates should stay closed: the regime where GSQ stores low precision and
re-quantizes at every step. (Zoology, Arora et al., 2023.)

Token layout (ids): ``reserved`` special ids first, then the key ids, the value ids and the filler ids::

    k₁ v₁ k₂ v₂ … k_N v_N | f f f … (gap) | q₁ a₁ q₂ a₂ … q_Q a_Q

A query ``qᵢ`` is scored at its own position: the model's argmax next token must be its value ``aᵢ``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..cache import GSQCache
from ..config import GSQConfig, resolve_config
from ..patch import is_patched, patched

__all__ = ["MQARBatch", "MQARSpec", "generate_mqar", "recall_accuracy"]


@dataclass(frozen=True)
class MQARSpec:
    """Shape of the task; the defaults are the ones MEASUREMENTS.md trained on (8 pairs, 64 keys/values)."""

    pairs: int = 8
    gap: int = 32
    queries: int = 8
    keys: int = 64
    values: int = 64
    filler: int = 16
    reserved: int = 2  # ids below this are left to the tokenizer's specials (pad, bos/eos)

    def __post_init__(self) -> None:
        for name in ("pairs", "gap", "queries", "keys", "values", "filler"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"MQARSpec.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.pairs > self.keys:
            raise ValueError(f"MQARSpec.pairs={self.pairs} needs as many distinct keys; keys={self.keys}")
        if self.queries > self.pairs:
            raise ValueError(f"MQARSpec.queries={self.queries} asks more distinct keys than pairs={self.pairs}")

    @property
    def vocab_size(self) -> int:
        return self.reserved + self.keys + self.values + self.filler

    @property
    def length(self) -> int:
        return 2 * self.pairs + self.gap + 2 * self.queries


@dataclass(frozen=True)
class MQARBatch:
    """``input_ids`` (num, length); ``query_mask`` (num, length): positions whose next token is an answer."""

    spec: MQARSpec
    input_ids: torch.Tensor
    query_mask: torch.Tensor


def generate_mqar(spec: MQARSpec, num: int, seed: int = 0) -> MQARBatch:
    """``num`` seeded MQAR sequences (vectorized: no Python loop over sequences)."""
    gen = torch.Generator().manual_seed(seed)
    key0, value0 = spec.reserved, spec.reserved + spec.keys
    filler0 = value0 + spec.values
    keys = torch.rand(num, spec.keys, generator=gen).argsort(dim=1)[:, : spec.pairs] + key0  # distinct per row
    values = torch.randint(value0, value0 + spec.values, (num, spec.pairs), generator=gen)
    asked = torch.rand(num, spec.pairs, generator=gen).argsort(dim=1)[:, : spec.queries]  # which pairs are queried
    context = torch.stack([keys, values], dim=2).flatten(1)  # (num, 2N)
    filler = torch.randint(filler0, filler0 + spec.filler, (num, spec.gap), generator=gen)
    queries = torch.stack([keys.gather(1, asked), values.gather(1, asked)], dim=2).flatten(1)  # (num, 2Q)
    input_ids = torch.cat([context, filler, queries], dim=1)
    query_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    query_mask[:, 2 * spec.pairs + spec.gap :: 2] = True
    return MQARBatch(spec, input_ids, query_mask)


@torch.inference_mode()
def recall_accuracy(
    model: torch.nn.Module,
    batch: MQARBatch,
    config: GSQConfig | str | dict = "fp32",
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Fraction of queries answered correctly, stepping every sequence token by token (decode-faithful).

    An unpatched model is patched with ``config`` for the run; a patched one keeps its patch and gets a
    ``config`` cache. Returns accuracy, correct/total counts and the per-sequence state memory of the last batch.
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    if batch.spec.vocab_size > vocab:
        raise ValueError(f"the MQAR task needs {batch.spec.vocab_size} token ids; the model has {vocab}")
    cfg = resolve_config(config)
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    correct = total = 0
    report: dict = {}
    steps = batch.input_ids.shape[1] - 1
    with contextlib.nullcontext() if is_patched(model) else patched(model, cfg):
        for ids, mask in tqdm(list(zip(batch.input_ids.split(batch_size), batch.query_mask.split(batch_size),
                                       strict=True)), desc=cfg.name, disable=not progress, leave=False):
            ids, mask = ids.to(device), mask.to(device)
            cache = GSQCache(model, cfg)
            predictions = torch.empty(ids.shape[0], steps, dtype=torch.long, device=device)
            for t in range(steps):
                predictions[:, t] = model(input_ids=ids[:, t : t + 1], cache=cache).logits[:, -1].argmax(-1)
            hits = (predictions == ids[:, 1:]) & mask[:, :-1]
            correct += int(hits.sum())
            total += int(mask[:, :-1].sum())
            report = cache.memory_report()
    rows = max(report.get("batch_size", 1), 1)
    return {"config": cfg.name, "accuracy": correct / total, "correct": correct, "queries": total,
            "avg_state_bits": report.get("avg_state_bits", 0.0), "state_bytes": report.get("state_bytes", 0) / rows,
            "full_precision_state_bytes": report.get("full_precision_state_bytes", 0) / rows}

