"""Multi-query associative recall (MQAR): an instrument where the recurrent state *is* the answer.

A sequence holds ``pairs`` key–value pairs, then ``gap`` filler tokens, then ``queries`` queries; each query is a
key seen earlier followed by its value. A model answers a query only from what its state kept across the filler,
so recall accuracy measures state fidelity directly (perplexity of small LMs barely reacts to state quantization).
During the filler a trained model's gates should stay closed: the regime where GSQ stores low precision and
re-quantizes at every step. (Zoology, Arora et al., 2023.)

Token layout (ids): ``reserved`` special ids first, then the key ids, the value ids and the filler ids::

    k₁ v₁ k₂ v₂ … k_N v_N | f f f … (gap) | q₁ a₁ q₂ a₂ … q_Q a_Q

A query ``qᵢ`` is scored at its own position: the model's argmax next token must be its value ``aᵢ``.

`recall_sweep` is what ``gsq-hf recall`` runs: every config over every gap, on one seeded set of pairs and
queries (the same seed at every gap gives the same pairs and queries; only the filler length changes), with
the task read from the model directory's ``recall_model.json`` (`load_recall_spec`, written by
``scripts/train_recall.py``).

Recall JSON contract (``gsq-hf recall --json``)::

    {"model", "task": {pairs, gap, queries, keys, values, filler, reserved}, "gaps", "num", "seed", "device",
     "dtype", "batch_size", "versions", "scoring", "trained": {family, parameters, recall_fp32, command},
     "results": [{"config", "policy", "recall", "recall_by_gap": {"32": ...}, "delta_vs_first",
                  "delta_by_gap", "delta_stderr", "delta_stderr_by_gap", "correct", "queries", "avg_state_bits",
                  "state_bytes", "full_precision_state_bytes", "tokens_per_second", "seconds",
                  "by_gap": {"32": {"recall", "correct", "queries", "sequence_correct", "avg_state_bits",
                                    "state_bytes"}}}, ...]}

``delta_*`` are recall differences from the first config in fractions (−0.02 = two points lower), with their
paired standard errors over the sequences (``sequence_correct``: correct answers per sequence);
``avg_state_bits`` is weighted by state writes over all gaps; ``state_bytes`` is per sequence (the largest
over the gaps).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..cache import GSQCache
from ..config import GSQConfig, resolve_config
from ..patch import is_patched, patched
from .data import EvalInputError
from .paired import recall_delta
from .stepping import needs_stepping, next_token_logits

__all__ = ["RECALL_INFO_FILE", "MQARBatch", "MQARSpec", "RecallInputError", "add_recall_deltas", "check_recall_task",
           "check_vocabulary", "generate_mqar", "load_recall_spec", "read_recall_info", "recall_accuracy",
           "recall_sweep", "recall_table"]

RECALL_INFO_FILE = "recall_model.json"  # written next to a recall model by scripts/train_recall.py


class RecallInputError(EvalInputError):
    """A recall task or model that cannot work (bad gap, more pairs than keys, too small a vocabulary)."""


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
                raise RecallInputError(f"MQARSpec.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.pairs > self.keys:
            raise RecallInputError(f"MQARSpec.pairs={self.pairs} needs as many distinct keys; keys={self.keys} "
                                   "(each pair has its own key: use pairs <= keys)")
        if self.queries > self.pairs:
            raise RecallInputError(f"MQARSpec.queries={self.queries} asks more distinct keys than "
                                   f"pairs={self.pairs} (use queries <= pairs)")

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
    desc: str | None = None,
    stepped: bool | None = None,
) -> dict:
    """Fraction of queries answered correctly, with every state stored as in generation (decode-faithful;
    chunked forwards or token by token as `gsq_hf.eval.stepping` chooses, ``stepped=True`` forces stepping).

    An unpatched model is patched with ``config`` for the run; a patched one keeps its patch and gets a
    ``config`` cache. Returns accuracy, correct/total counts (and the correct answers per sequence:
    ``sequence_correct``, for paired differences between configs), the average stored bits over every batch's
    writes (``writes``: sequence-steps) and the per-sequence state memory (the largest batch's).
    """
    check_vocabulary(model, batch.spec)
    cfg = resolve_config(config)
    stepped = needs_stepping(model, cfg, stepped)
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    correct = total = writes = 0
    bits = state = full = 0.0
    per_sequence = []
    steps = batch.input_ids.shape[1] - 1
    start = time.perf_counter()
    with contextlib.nullcontext() if is_patched(model) else patched(model, cfg):
        for ids, mask in tqdm(list(zip(batch.input_ids.split(batch_size), batch.query_mask.split(batch_size),
                                       strict=True)), desc=desc or cfg.name, disable=not progress, leave=False):
            ids, mask = ids.to(device), mask.to(device)
            cache = GSQCache(model, cfg)
            predictions = torch.empty(ids.shape[0], steps, dtype=torch.long, device=device)
            for t, logits in next_token_logits(model, ids[:, :-1], cache, stepped):
                predictions[:, t : t + logits.shape[0]] = logits.argmax(-1).T
            hits = (predictions == ids[:, 1:]) & mask[:, :-1]
            per_sequence.append(hits.sum(dim=1).cpu())
            correct += int(hits.sum())
            total += int(mask[:, :-1].sum())
            report = cache.memory_report()
            rows = max(report.get("batch_size", ids.shape[0]), 1)
            bits += report.get("avg_state_bits", 0.0) * ids.shape[0] * steps  # weighted by writes
            writes += ids.shape[0] * steps
            state = max(state, report.get("state_bytes", 0) / rows)
            full = max(full, report.get("full_precision_state_bytes", 0) / rows)
    seconds = time.perf_counter() - start
    return {"config": cfg.name, "evaluation": "stepped" if stepped else "chunked",
            "accuracy": correct / total, "correct": correct, "queries": total,
            "sequence_correct": torch.cat(per_sequence).tolist(), "avg_state_bits": bits / writes,
            "state_bytes": state, "full_precision_state_bytes": full,
            "writes": writes, "seconds": seconds}


def check_vocabulary(model: torch.nn.Module, spec: MQARSpec) -> None:
    """Refuse a model whose output vocabulary cannot hold every key, value and filler id of ``spec``."""
    vocab = model.get_output_embeddings().weight.shape[0]
    if spec.vocab_size > vocab:
        raise RecallInputError(
            f"the MQAR task needs {spec.vocab_size} token ids; the model has {vocab} ({spec.reserved} reserved + "
            f"{spec.keys} keys + {spec.values} values + {spec.filler} filler ids): use a model trained for this "
            "task (scripts/train_recall.py) or a task with fewer keys/values")


def read_recall_info(model_dir: str | Path) -> dict[str, Any]:
    """The ``recall_model.json`` of a recall model directory (task, training command, stated fp32 recall)."""
    directory = Path(model_dir).expanduser()
    if not directory.is_dir():
        raise RecallInputError(f"model directory {str(model_dir)!r} does not exist; pass a directory written by "
                               "scripts/train_recall.py (a saved model with a recall_model.json)")
    info_file = directory / RECALL_INFO_FILE
    if not info_file.is_file():
        raise RecallInputError(f"{info_file} not found: gsq-hf recall reads the task (pairs, keys, values, "
                               "filler) from the recall_model.json that scripts/train_recall.py writes")
    try:
        info = json.loads(info_file.read_text())
    except json.JSONDecodeError as error:
        raise RecallInputError(f"{info_file} is not valid JSON ({error})") from None
    if not isinstance(info, dict) or not isinstance(info.get("spec"), dict):
        raise RecallInputError(f"{info_file} has no readable 'spec' object (the MQARSpec the model was trained on)")
    return info


def load_recall_spec(model_dir: str | Path, *, pairs: int | None = None, queries: int | None = None) -> MQARSpec:
    """The task a recall model was trained on (``recall_model.json``), with ``pairs``/``queries`` overridden.

    Lowering ``pairs`` alone lowers ``queries`` to fit (every query asks a distinct key).
    """
    stored = read_recall_info(model_dir)["spec"]
    names = {f.name for f in fields(MQARSpec)}
    try:
        spec = MQARSpec(**{key: value for key, value in stored.items() if key in names})
    except TypeError as error:
        raise RecallInputError(f"the 'spec' of {Path(model_dir) / RECALL_INFO_FILE} is incomplete ({error})") \
            from None
    if pairs is not None:
        return replace(spec, pairs=pairs, queries=queries if queries is not None else min(spec.queries, pairs))
    return spec if queries is None else replace(spec, queries=queries)


def check_recall_task(model: torch.nn.Module, spec: MQARSpec, gaps: Sequence[int], num: int = 1) -> None:
    """Raise `RecallInputError` before any run for a gap < 1, ``num`` < 1 or a vocabulary too small."""
    bad = [g for g in gaps if not isinstance(g, int) or isinstance(g, bool) or g < 1]
    if not gaps or bad:
        what = f"gap {bad[0]!r} is" if bad else "an empty gap list is"
        raise RecallInputError(f"{what} not accepted: gaps are positive integers (filler tokens between the "
                               "pairs and the queries), e.g. 32,128,512")
    if not isinstance(num, int) or num < 1:
        raise RecallInputError(f"num must be a positive number of sequences, got {num!r}")
    check_vocabulary(model, spec)


def recall_sweep(
    model: torch.nn.Module,
    spec: MQARSpec,
    configs: Sequence[GSQConfig | str | dict] | GSQConfig | str | dict,
    gaps: Sequence[int] | None = None,
    num: int = 512,
    *,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Decode-faithful recall of every config at every gap: ``{"task", "gaps", "num", "seed", "results"}``
    (``progress``: a bar per config and gap, as `decode_faithful_perplexity` shows one).

    Every config scores the same ``num`` sequences per gap (seed ``seed`` at every gap: the same pairs and
    queries, only the filler length changes). Records follow the module's JSON contract; deltas are against
    the first config.
    """
    gaps = [spec.gap] if gaps is None else list(gaps)
    check_recall_task(model, spec, gaps, num)
    configs = [configs] if isinstance(configs, (str, dict, GSQConfig)) else configs  # one config, not its letters
    resolved = [resolve_config(c) for c in configs]
    batches = {gap: generate_mqar(replace(spec, gap=gap), num, seed=seed) for gap in gaps}
    records = []
    for cfg in resolved:
        by_gap = {str(gap): recall_accuracy(model, batch, cfg, batch_size=batch_size, progress=progress,
                                            desc=f"{cfg.name} gap {gap}") for gap, batch in batches.items()}
        runs = list(by_gap.values())
        correct, queries = sum(r["correct"] for r in runs), sum(r["queries"] for r in runs)
        writes, seconds = sum(r["writes"] for r in runs), sum(r["seconds"] for r in runs)
        records.append({
            "config": cfg.name, "policy": cfg.policy.kind, "evaluation": runs[0]["evaluation"],
            "recall": correct / queries,
            "recall_by_gap": {gap: r["accuracy"] for gap, r in by_gap.items()},
            "correct": correct, "queries": queries,
            "avg_state_bits": sum(r["avg_state_bits"] * r["writes"] for r in runs) / writes,
            "state_bytes": max(r["state_bytes"] for r in runs),
            "full_precision_state_bytes": max(r["full_precision_state_bytes"] for r in runs),
            "tokens_per_second": writes / seconds if seconds > 0 else None, "seconds": seconds,
            "by_gap": {gap: {"recall": r["accuracy"], "correct": r["correct"], "queries": r["queries"],
                             "sequence_correct": r["sequence_correct"], "avg_state_bits": r["avg_state_bits"],
                             "state_bytes": r["state_bytes"]}
                       for gap, r in by_gap.items()},
        })
    add_recall_deltas(records)
    return {"task": asdict(spec), "gaps": gaps, "num": num, "seed": seed, "results": records}


def add_recall_deltas(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set each record's recall difference from the first record's, overall and per gap, and their paired
    standard errors over the sequences (`gsq_hf.eval.paired.recall_delta`; overall, a sequence's answers at every
    gap are one unit: the same pairs and queries) where the records carry ``sequence_correct`` (in place)."""
    first = records[0] if records else None
    for record in records:
        record["delta_vs_first"] = record["recall"] - first["recall"]
        record["delta_by_gap"] = {gap: value - first["recall_by_gap"][gap]
                                  for gap, value in record["recall_by_gap"].items()}
        if all("sequence_correct" in g for r in (record, first) for g in r["by_gap"].values()):
            stderr = {gap: recall_delta(g["sequence_correct"], first["by_gap"][gap]["sequence_correct"],
                                        g["queries"])[1] for gap, g in record["by_gap"].items()}
            record["delta_stderr_by_gap"] = stderr
            record["delta_stderr"] = recall_delta(*(_per_sequence(r) for r in (record, first)),
                                                  record["queries"])[1]
    return records


def _per_sequence(record: dict[str, Any]) -> list[int]:
    """Correct answers per sequence, summed over the gaps."""
    return torch.tensor([g["sequence_correct"] for g in record["by_gap"].values()]).sum(dim=0).tolist()


def recall_table(records: Sequence[dict[str, Any]]) -> str:
    """One row per config: recall overall and per gap (%), Δ vs the first config (points ± its paired standard
    error over the sequences, where known), state size."""
    from .report import format_table

    gaps = list(records[0]["recall_by_gap"]) if records else []
    headers = ["config", "recall %", "Δ vs first", *(f"gap {g} %" for g in gaps), "avg bits", "state B/seq",
               "vs full", "queries", "tok/s"]
    rows = []
    for r in records:
        full = r["full_precision_state_bytes"]
        speed = r.get("tokens_per_second")
        rows.append([
            r["config"], f"{100 * r['recall']:.2f}",
            f"{100 * r['delta_vs_first']:+.2f}"
            + (f" ± {100 * r['delta_stderr']:.2f}" if math.isfinite(r.get("delta_stderr", math.nan)) else ""),
            *(f"{100 * r['recall_by_gap'][g]:.2f}" for g in gaps), f"{r['avg_state_bits']:.2f}",
            f"{r['state_bytes']:,.0f}", f"{r['state_bytes'] / full:.3f}" if full else "-", str(r["queries"]),
            f"{speed:,.1f}" if speed else "-",
        ])
    return format_table(headers, rows)

