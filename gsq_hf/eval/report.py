"""Tables for the terminal and the JSON files ``gsq-hf eval/memory --json`` write.

Eval JSON contract::

    {"model", "dataset", "split", "context", "versions": {python, torch, transformers, gsq_hf},
     "weight_bytes", "quantization", "device_map", "processes",
     "results": [{"config", "policy", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "tokens",
                  "avg_state_bits", "state_bytes", "full_precision_state_bytes", "tokens_per_second",
                  "delta_vs_reference", "weight_bytes", "weights_plus_batch_state_bytes", ...}, ...]}

State sizes are per sequence; ``weight_bytes`` is the model's weights as stored (``get_memory_footprint()``,
int8/4-bit with ``--load-in-8bit``/``--load-in-4bit``) and ``weights_plus_batch_state_bytes`` the weights plus
``batch_size`` sequences of state: the memory the run's batches need beside activations.
``delta_vs_reference`` is the relative perplexity change against the first config's record; ``kl_divergence``
(± ``kl_stderr`` over windows) and ``top1_agreement`` score each later config's next-token distributions
against the first config's (``--kl-top-k``; `gsq_hf.eval.ReferenceTopK`). A config that
failed (non-finite logits) keeps its record with ``"error"`` set and null metrics, so a reader never mistakes
it for a number. NaN/Inf are written as null (strict JSON).

Memory JSON (``gsq-hf memory``): the same header with ``batch_size``, ``prompt_tokens``, ``new_tokens``, and
one record per config (``unpatched`` first) with ``weight_bytes`` (the model's weights as stored),
``peak_rss_bytes``, ``generate_rss_delta_bytes``, ``rss_peak_scope``, ``peak_cuda_bytes``,
``generate_cuda_delta_bytes``, ``state_bytes`` (per sequence),
``generated_tokens``, ``seconds``, ``tokens_per_second`` (see `gsq_hf.eval.memory`).
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["add_deltas", "eval_table", "failed_record", "format_table", "memory_table", "versions", "weights_line",
           "write_json"]

METRICS = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "avg_state_bits", "state_bytes",
           "full_precision_state_bytes", "tokens_per_second")


def versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "gsq_hf": __version__}


def failed_record(config: str, tokens: int, error: str) -> dict[str, Any]:
    """The record of a config whose evaluation failed: every metric null, the reason in ``error``."""
    return {"config": config, **dict.fromkeys(METRICS), "tokens": tokens, "error": error}


def add_deltas(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set ``delta_vs_reference`` = ppl / first config's ppl - 1 on every record (None where undefined)."""
    base = records[0].get("perplexity") if records else None
    for record in records:
        ppl = record.get("perplexity")
        record["delta_vs_reference"] = ppl / base - 1.0 if _number(ppl) and _number(base) and base else None
    return records


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if _number(value) else "-"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text columns: the first (config name) left-aligned, numbers right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _ratio(part: Any, whole: Any) -> str:
    return f"{part / whole:.3f}" if _number(part) and _number(whole) and whole else "-"


def _failed(record: dict[str, Any], width: int) -> list[str]:
    return [record["config"], "FAILED", *["-"] * (width - 2)]


def _notes(records: list[dict[str, Any]]) -> str:
    """The errors of failed configs, below the table (a cell would stretch its column)."""
    return "".join(f"\n{r['config']}: {r['error']}" for r in records if r.get("error"))


def eval_table(records: list[dict[str, Any]]) -> str:
    """One row per config: metrics, Δ and KL vs the first config, per-sequence state size and speed."""
    headers = ["config", "ppl", "word ppl", "byte ppl", "bits/byte", "Δ vs first", "KL vs first", "top-1",
               "avg bits", "state B/seq", "vs full", "tokens", "tok/s"]
    rows = []
    for r in records:
        if r.get("error"):
            rows.append(_failed(r, len(headers)))
            continue
        delta = r.get("delta_vs_reference")
        rows.append([
            r["config"], _fmt(r["perplexity"], ".4f"), _fmt(r["word_perplexity"], ".4f"),
            _fmt(r["byte_perplexity"], ".4f"), _fmt(r["bits_per_byte"], ".4f"),
            f"{delta:+.3%}" if _number(delta) else "-", _fmt(r.get("kl_divergence"), ".2e"),
            _fmt(r.get("top1_agreement"), ".2%"), _fmt(r.get("avg_state_bits"), ".2f"),
            _fmt(r.get("state_bytes"), ",.0f"), _ratio(r.get("state_bytes"), r.get("full_precision_state_bytes")),
            str(r["tokens"]), _fmt(r["tokens_per_second"], ",.1f"),
        ])
    return format_table(headers, rows) + _notes(records)


def weights_line(records: list[dict[str, Any]], weight_bytes: int, batch_size: int, weights_format: str) -> str:
    """The model's weights beside the states: weights + a batch of states is what an evaluation needs."""
    totals = ", ".join(f"{r['config']} {_mib(weight_bytes + batch_size * r['state_bytes'])}"
                       for r in records if _number(r.get("state_bytes")))
    return (f"model weights: {_mib(weight_bytes)} MiB as stored ({weights_format}); weights + the states of "
            f"{batch_size} sequences (MiB): {totals or '-'}")


def memory_table(records: list[dict[str, Any]]) -> str:
    """One row per config of ``gsq-hf memory``: peak memory during ``generate`` and the state it keeps."""
    cuda = any(_number(r.get("peak_cuda_bytes")) for r in records)
    headers = ["config", "weights MiB", "peak RSS MiB", "Δ RSS in generate MiB",
               *(["peak CUDA MiB", "Δ CUDA MiB"] if cuda else []), "state B/seq", "vs first", "tok/s"]
    base = records[0].get("state_bytes") if records else None
    rows = []
    for r in records:
        if r.get("error"):
            rows.append(_failed(r, len(headers)))
            continue
        rows.append([
            r["config"], _mib(r.get("weight_bytes")), _mib(r["peak_rss_bytes"]), _mib(r["generate_rss_delta_bytes"]),
            *([_mib(r["peak_cuda_bytes"]), _mib(r["generate_cuda_delta_bytes"])] if cuda else []),
            _fmt(r["state_bytes"], ",.0f"), _ratio(r["state_bytes"], base), _fmt(r["tokens_per_second"], ",.1f"),
        ])
    return format_table(headers, rows) + _notes(records)


def _mib(value: Any) -> str:
    return _fmt(value / 2**20 if _number(value) else None, ",.2f")


def _strict(value: Any) -> Any:
    """Replace NaN/Inf (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_strict(payload), indent=2, allow_nan=False) + "\n")
    return path
