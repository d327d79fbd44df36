"""Tables for the terminal and the JSON files ``gsq-hf eval/memory/recall --json`` write.

Eval JSON contract::

    {"model", "dataset", "split", "context", "versions": {python, torch, transformers, gsq_hf},
     "weight_bytes", "quantization", "device_map", "processes", "threads", "kl_top_k",
     "configs": [the names asked for], "status": "partial" | "interrupted" | "complete",
     "results": [{"config", "policy", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "tokens",
                  "avg_state_bits", "state_bytes", "ssm_state_bytes", "full_precision_state_bytes", "seconds",
                  "tokens_per_second", "delta_vs_reference", "delta_stderr", "delta_nll", "delta_nll_stderr",
                  "window_nll_sum", "weight_bytes", "weights_plus_batch_state_bytes", ...}, ...]}

The file is rewritten (atomically) after every config: ``"status": "partial"`` while configs remain (or
after a crash), ``"interrupted"`` after Ctrl-C, ``"complete"`` at the end (with ``"reference"``, and
``"failed_configs"``: those whose logits went NaN/Inf, their records holding ``"error"``).
State sizes are per sequence: ``avg_state_bits`` is what a step stores per SSM state element (bytes moved),
``state_bytes`` what the cache allocates (`allocated_bits` per element: more for threshold policies, which keep a
high-format slot for every unit). ``weight_bytes`` is the model's weights as stored (``get_memory_footprint()``,
int8/4-bit with ``--load-in-8bit``/``--load-in-4bit``) and ``weights_plus_batch_state_bytes`` the weights plus
``batch_size`` sequences of state: the memory the run's batches need beside activations. ``delta_vs_reference`` is
the relative perplexity change against the first config's record, ``delta_stderr`` its standard error paired over
the windows (``window_nll_sum``: ΣNLL per window), ``delta_nll`` ± ``delta_nll_stderr`` the change of mean NLL per
token (nats); ``kl_divergence`` (± ``kl_stderr`` over windows) and ``top1_agreement`` score each later config's
next-token distributions against the first config's (``--kl-top-k``; `gsq_hf.eval.ReferenceTopK`). A config that
failed (non-finite logits) keeps its record with ``"error"`` set and null metrics, so a reader never mistakes it for
a number. NaN/Inf are written as null (strict JSON). Speed (``seconds``, ``tokens_per_second``) is in the JSON only:
one pass, untimed warm-up aside, on a possibly shared machine.

Memory JSON (``gsq-hf memory``): the same header with ``batch_size``, ``prompt_tokens``, ``new_tokens``,
``threads``, ``resolution_bytes`` (`peak_resolution` of ``peak_rss_bytes`` and ``peak_cuda_bytes``) and one
record per run (``unpatched`` first, and again last with ``"repeat": true``) with ``weight_bytes`` (the model's
weights as stored), ``peak_rss_bytes``, ``generate_rss_delta_bytes``, ``rss_peak_scope``, ``peak_cuda_bytes``,
``generate_cuda_delta_bytes``, ``state_bytes`` (per sequence), ``generated_tokens``, ``seconds``,
``tokens_per_second`` (see `gsq_hf.eval.memory`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .paired import perplexity_delta

__all__ = ["add_deltas", "allocated_bits", "eval_legend", "eval_table", "failed_record", "format_table",
           "memory_table", "over_allocated", "peak_resolution", "versions", "weights_line", "write_json"]

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


def add_deltas(records: list[dict[str, Any]], base: dict[str, Any] | None = None,
               key: str = "delta_vs_reference") -> list[dict[str, Any]]:
    """Set ``key`` = ppl / the base's ppl - 1 on every record (base: the first record by default; None where
    undefined), and its standard error paired over the windows with Δ mean NLL
    (`gsq_hf.eval.paired.perplexity_delta`)."""
    base = (records[0] if records else {}) if base is None else base
    reference = base.get("perplexity")
    for record in records:
        ppl = record.get("perplexity")
        record[key] = ppl / reference - 1.0 if _number(ppl) and _number(reference) and reference else None
        record.update(perplexity_delta(record, base) if record[key] is not None
                      else dict.fromkeys(("delta_nll", "delta_nll_stderr", "delta_stderr")))
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


def _delta(delta: Any, stderr: Any) -> str:
    """``+0.197% ± 0.080``: a relative change and its standard error in percentage points (one window: none)."""
    if not _number(delta):
        return "-"
    return f"{delta:+.3%}" + (f" ± {100 * stderr:.3f}" if _number(stderr) else "")


def _ratio(part: Any, whole: Any) -> str:
    return f"{part / whole:.3f}" if _number(part) and _number(whole) and whole else "-"


def _failed(record: dict[str, Any], width: int) -> list[str]:
    return [record["config"], "FAILED", *["-"] * (width - 2)]


def _notes(records: list[dict[str, Any]]) -> str:
    """The errors of failed configs, below the table (a cell would stretch its column)."""
    return "".join("\n" + (r["error"] if r["error"].startswith(f"{r['config']}: ") else f"{r['config']}: {r['error']}")
                   for r in records if r.get("error"))


def allocated_bits(record: dict[str, Any]) -> float | None:
    """Bits *allocated* per SSM state element (payload, scales, high-format slots and slot maps), the
    capacity counterpart of ``avg_state_bits`` (bits *stored* per element and write: what a step moves).

    Threshold policies (gate, entropy) keep a high-format slot for every unit, so this exceeds their
    ``avg_state_bits`` (docs/design.md, "Storage"). None for records without the SSM byte counts.
    """
    ssm, full = record.get("ssm_state_bytes"), record.get("full_precision_ssm_state_bytes")
    return 32.0 * ssm / full if _number(ssm) and _number(full) and full else None  # full: fp32, 32 bits/elem


def over_allocated(record: dict[str, Any], tolerance: float = 1.05) -> bool:
    """Whether a config allocates clearly more bits per element than it stores per write."""
    allocated, stored = allocated_bits(record), record.get("avg_state_bits")
    return allocated is not None and _number(stored) and allocated > tolerance * stored


def eval_table(records: list[dict[str, Any]], kl_top_k: int | None = None, legend: bool = True) -> str:
    """One row per config, then (``legend``) a legend of the columns (Δ, KL and top-1 are vs the first row).

    Bits moved per element and bytes allocated per sequence are separate columns because threshold policies
    save the first but not the second (``*`` marks such rows). No speed column: one pass per config on a
    possibly shared machine times its load and first-call costs, not the config (7.8-67 tok/s between rows of
    one run were seen); seconds stay in the JSON, and scripts/bench_eval_speed.py and bench_generate.py time
    configs properly (best of repeats).
    """
    headers = ["config", "ppl", "word ppl", "byte ppl", "bits/byte", "Δ ppl vs first", "KL vs first", "top-1",
               "bits moved/elem", "alloc bits/elem", "alloc B/seq", "alloc vs full", "tokens"]
    rows = []
    for r in records:
        if r.get("error"):
            rows.append(_failed(r, len(headers)))
            continue
        delta = r.get("delta_vs_reference")
        rows.append([
            r["config"] + (" *" if over_allocated(r) else ""), _fmt(r["perplexity"], ".4f"),
            _fmt(r["word_perplexity"], ".4f"), _fmt(r["byte_perplexity"], ".4f"), _fmt(r["bits_per_byte"], ".4f"),
            _delta(delta, r.get("delta_stderr")), _fmt(r.get("kl_divergence"), ".2e"),
            _fmt(r.get("top1_agreement"), ".2%"), _fmt(r.get("avg_state_bits"), ".2f"),
            _fmt(allocated_bits(r), ".2f"), _fmt(r.get("state_bytes"), ",.0f"),
            _ratio(r.get("state_bytes"), r.get("full_precision_state_bytes")), str(r["tokens"]),
        ])
    return format_table(headers, rows) + _notes(records) + ("\n" + eval_legend(records, kl_top_k) if legend else "")


def eval_legend(records: list[dict[str, Any]], kl_top_k: int | None = None, width: int = 116) -> str:
    """What each column of `eval_table` means, naming the first config (the baseline of Δ, KL and top-1)."""
    first = records[0]["config"] if records else "the first row"
    entries = [
        ("ppl", "perplexity per token (word ppl, byte ppl: per word, per UTF-8 byte), with the state stored after "
                "every token"),
        ("bits/byte", "ΣNLL / (bytes · ln 2)"),
        ("Δ ppl vs first", "perplexity change relative to the first row ± its standard error over the windows "
                           "(paired: both rows scored the same windows; noise in the state can lower it by luck)"),
        ("KL vs first", f"mean KL({first} ‖ config) per scored token, nats, over {first}'s "
                        f"top-{kl_top_k or 'k'} logits and one bin for the rest (a lower bound; 0: same predictions)"),
        ("top-1", f"share of scored tokens whose most likely next token is {first}'s"),
        ("bits moved/elem", "average bits stored per SSM state element per write, scales included: what a decode "
                            "step reads and writes (bandwidth)"),
        ("alloc bits/elem", "SSM state bytes allocated per element x 8: what the cache holds (capacity)"),
        ("alloc B/seq", "state bytes allocated per sequence (SSM + conv, scales, slot maps); vs full: over "
                        "transformers' own cache"),
    ]
    marked = [r["config"] for r in records if not r.get("error") and over_allocated(r)]
    if marked:
        entries.append(("*", "allocates more than its bits moved suggest: its high-format slots stay allocated "
                             "whether a step uses them or not (gate, entropy: one per unit; budget: a fixed "
                             "number), so it saves bytes moved per step more than memory"))
    indent = max(len(name) for name, _ in entries) + 2
    return f"columns (Δ, KL and top-1 compare each row with the first, {first}):\n" + "\n".join(
        textwrap.fill(text, width, initial_indent=f"  {name:<{indent}}", subsequent_indent=" " * (indent + 2))
        for name, text in entries)


def weights_line(records: list[dict[str, Any]], weight_bytes: int, batch_size: int, weights_format: str) -> str:
    """The model's weights beside the states: weights + a batch of states is what an evaluation needs."""
    totals = ", ".join(f"{r['config']} {_mib(weight_bytes + batch_size * r['state_bytes'])}"
                       for r in records if _number(r.get("state_bytes")))
    return (f"model weights: {_mib(weight_bytes)} MiB as stored ({weights_format}); weights + the states of "
            f"{batch_size} sequences (MiB): {totals or '-'}")


def peak_resolution(records: list[dict[str, Any]], key: str) -> int | None:
    """The smallest difference of peak ``key`` (``peak_rss_bytes``, ``peak_cuda_bytes``) that is not noise.

    `gsq_hf.eval.memory.measure_configs` measures the unpatched model first and again last (``"repeat"``):
    their peaks' difference, and that of every config storing as many state bytes as the unpatched model
    (fp32: whatever its peak moved by, it was not the state), at least one unit of what the measure counts
    (RSS counts 4 KiB pages, the CUDA caching allocator rounds blocks to 512 bytes). A lower bound of the
    run-to-run noise. None unless both unpatched runs measured ``key``.
    """
    repeat = next((r for r in records if r.get("repeat")), None)
    base = records[0] if records else {}
    runs = [base.get(key), repeat and repeat.get(key)]
    if not all(_number(v) for v in runs):
        return None
    same_state = [r[key] for r in records[1:] if not r.get("error") and not r.get("repeat") and _number(r.get(key))
                  and r.get("state_bytes") is not None and r.get("state_bytes") == base.get("state_bytes")]
    return max(abs(runs[0] - runs[1]), *(abs(peak - runs[0]) for peak in same_state),
               4096 if key == "peak_rss_bytes" else 512)


def memory_table(records: list[dict[str, Any]], batch_size: int = 1) -> str:
    """One row per ``gsq-hf memory`` run: the peak during ``generate`` and its difference from the unpatched
    run's, beside the exact state bytes and their difference over the ``batch_size`` sequences, and whether
    the peak can resolve that state difference; a footer gives the resolution and how it was measured.

    No speed column: one ``generate`` per process times start-up and machine load (seconds stay in the JSON).
    """
    cuda = any(_number(r.get("peak_cuda_bytes")) for r in records)
    key, name = ("peak_cuda_bytes", "CUDA") if cuda else ("peak_rss_bytes", "RSS")
    resolution = peak_resolution(records, key)
    base = records[0] if records and not records[0].get("error") else {}
    headers = ["config", "weights MiB", "peak RSS MiB", *(["peak CUDA MiB"] if cuda else []),
               f"Δ peak {name} KiB", "state B/seq", f"Δ state x{batch_size} KiB", "resolved"]
    rows, unresolved = [], []
    for r in records:
        if r.get("error"):
            rows.append(_failed(r, len(headers)))
            continue
        state_delta = _difference(r.get("state_bytes"), base.get("state_bytes"))
        state_delta = None if state_delta is None else batch_size * state_delta
        resolved = "-"  # the unpatched runs are the baseline, not a comparison
        if r is not base and not r.get("repeat") and state_delta is not None and resolution is not None:
            resolved = "yes" if abs(state_delta) > resolution else "no"
            unresolved += [r["config"]] if resolved == "no" else []
        rows.append([
            r["config"] + (" (again)" if r.get("repeat") else ""), _mib(r.get("weight_bytes")),
            _mib(r["peak_rss_bytes"]), *([_mib(r["peak_cuda_bytes"])] if cuda else []),
            _kib(_difference(r.get(key), base.get(key))), _fmt(r["state_bytes"], ",.0f"), _kib(state_delta),
            resolved,
        ])
    if resolution is None:
        footer = f"resolution unknown (an unpatched run failed): a Δ peak {name} may be noise."
    else:
        footer = (f"resolution: {resolution / 1024:,.1f} KiB of peak {name} (the most that the two unpatched runs, "
                  "first and last, and any config storing the unpatched state bytes differ by, at least one "
                  "allocation unit; a lower bound of run-to-run noise): "
                  + (f"no ({', '.join(unresolved)}): the state difference is within it, so that Δ peak is noise, "
                     "not state." if unresolved else "every config's state difference exceeds it."))
    footer += (" state B/seq is exact (tensor bytes counted); Δ state: its difference from unpatched x the batch; "
               "resolved: |Δ state| > resolution")
    return format_table(headers, rows) + _notes(records) + "\n" + textwrap.fill(footer, 116)


def _difference(value: Any, base: Any) -> float | None:
    return value - base if _number(value) and _number(base) else None


def _mib(value: Any) -> str:
    return _fmt(value / 2**20 if _number(value) else None, ",.2f")


def _kib(value: Any) -> str:
    return _fmt(value / 1024 if _number(value) else None, "+,.1f")


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
    """Write ``payload`` to ``path`` atomically (a temporary file renamed over it): a reader, or a run killed
    mid-write, sees the previous complete file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_strict(payload), indent=2, allow_nan=False) + "\n"
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: the rename stays atomic
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
