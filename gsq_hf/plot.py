"""Figures of what a state config does: where it spends precision, and what it costs for the bits it stores.

    from gsq_hf import plot
    plot.precision_trace(cache.precision_trace())      # layer x token heatmap of the fraction stored high
    plot.pareto("results.json")                        # perplexity vs average stored bits (a payload or its path)
    plot.by_position(records)                          # Δ perplexity per position bucket along long streams
    plot.families(records, y="recall_loss")            # any metric vs average stored bits, one line per family

Each returns a `matplotlib.figure.Figure` built without pyplot (no global figure state; a notebook shows it
once, with or without ``%matplotlib inline``; ``fig.savefig(path)`` writes it). matplotlib is imported only when
a function is called: ``pip install "gsq_hf[plot]"``.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["by_position", "families", "label_points", "pareto", "precision_trace", "save"]

STATIC_POLICY = "static"
_DYNAMIC_STYLES = [("s", "tab:orange"), ("^", "tab:green"), ("D", "tab:red"), ("v", "tab:purple"),
                   ("P", "tab:brown"), ("X", "tab:pink"), ("*", "tab:olive"), ("h", "tab:cyan"),
                   ("<", "tab:gray"), (">", "black")]


def _figure(**kwargs) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - exercised only without matplotlib
        raise ImportError('gsq_hf.plot needs matplotlib: pip install "gsq_hf[plot]"') from error
    _show_in_notebooks(Figure)
    return Figure(**kwargs)


def _show_in_notebooks(figure_type: type) -> None:
    """In IPython, a returned figure displays as a PNG even before ``%matplotlib inline`` (a pyplot-free Figure
    has no display hook of its own until then); a formatter already registered for it is kept."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    formatters = getattr(getattr(shell, "display_formatter", None), "formatters", {})
    png = formatters.get("image/png")
    if png is None:
        return
    try:
        png.lookup_by_type(figure_type)
    except KeyError:
        png.for_type(figure_type, _png_bytes)


def _png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def save(fig: Figure, path, dpi: int = 150) -> None:
    """Write ``fig`` to ``path`` (format from the suffix), creating the folder."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")


# -- precision trace --------------------------------------------------------------------------------------
def _trace_parts(trace) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(layers, writes, batch)`` fractions and the metadata of a trace dict, a result or a bare tensor."""
    if not isinstance(trace, (Mapping, torch.Tensor)) and hasattr(trace, "trace"):  # a PerplexityResult
        if trace.trace is None:
            raise ValueError(f"result {trace.config!r} has no trace: run decode_faithful_perplexity(..., trace=True)")
        trace = trace.trace
    if isinstance(trace, Mapping):
        high, meta = trace["high_fraction"], dict(trace)
    else:
        high, meta = trace, {}
    high = torch.as_tensor(high, dtype=torch.float32)
    if high.dim() == 2:
        high = high[:, :, None]
    if high.dim() != 3:
        raise ValueError(f"a precision trace is (layers, tokens) or (layers, tokens, batch), got {tuple(high.shape)}")
    return high, meta


def precision_trace(
    trace,
    *,
    row: int | None = None,
    tokens: Sequence[str] | None = None,
    title: str | None = None,
    summary: bool = True,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Layer x token heatmap of the fraction of units stored in the high format.

    ``trace``: the dict of `GSQCache.precision_trace` (or a `PerplexityResult` run with ``trace=True``, or a
    ``(layers, tokens[, batch])`` tensor). ``row``: one batch row; None averages the rows. ``tokens``: labels
    of the tokens on the x axis (used when there are at most 64). ``summary``: add a panel below with the
    fraction over all layers per token and its mean.
    """
    high, meta = _trace_parts(trace)
    layers, writes, batch = high.shape
    if row is None:
        data, rows_text = high.nanmean(dim=2), (f"mean over {batch} rows" if batch > 1 else "1 row")
    else:
        if not -batch <= row < batch:
            raise IndexError(f"row {row} out of range for a trace of {batch} rows")
        data, rows_text = high[:, :, row], f"row {row % batch}"
    data = data.numpy()
    layer_ids = list(meta.get("layers") or range(layers))
    high_name, low_name = meta.get("high_format"), meta.get("low_format")

    width = min(14.0, max(6.0, 3.0 + writes / 40)) if tokens is None or writes > 64 else max(6.0, 0.28 * writes + 2)
    height = 0.9 + 0.32 * max(layers, 4) + (1.5 if summary else 0)
    fig = _figure(figsize=figsize or (width, height), layout="constrained")
    if summary:
        heat_ax, line_ax = fig.subplots(2, 1, sharex=True, height_ratios=[max(layers, 3), 2.2])
    else:
        heat_ax, line_ax = fig.subplots(1, 1), None
    image = heat_ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0,
                           origin="upper", extent=(-0.5, writes - 0.5, layers - 0.5, -0.5))
    heat_ax.set_yticks(range(layers), [str(i) for i in layer_ids])
    heat_ax.set_ylabel("layer")
    colorbar = fig.colorbar(image, ax=heat_ax if line_ax is None else [heat_ax, line_ax], pad=0.01, shrink=0.95)
    colorbar.set_label(f"fraction in {high_name or 'high'}" + (f" (else {low_name})" if low_name else ""))
    config = meta.get("config")
    heading = title or " — ".join(p for p in (config, f"precision trace, {rows_text}") if p)
    heat_ax.set_title(heading)

    bottom = heat_ax
    if line_ax is not None:
        per_token = data.mean(axis=0) if layers else data.sum(axis=0)
        steps = range(writes)
        line_ax.plot(steps, per_token, color="tab:blue", linewidth=1.2, drawstyle="steps-mid")
        mean = float(per_token.mean()) if writes else math.nan
        if math.isfinite(mean):
            line_ax.axhline(mean, color="0.4", linestyle="--", linewidth=1)
        line_ax.set_title(f"all layers; dashed: mean {mean:.2f}", fontsize="small", loc="left")
        line_ax.set_ylim(-0.05, 1.05)
        line_ax.set_ylabel("fraction high")
        line_ax.grid(True, alpha=0.3)
        bottom = line_ax
    if tokens is not None and len(tokens) == writes and writes <= 64:
        bottom.set_xticks(range(writes), [_token_label(t) for t in tokens], rotation=90, fontsize="small")
    bottom.set_xlabel("token (state write)")
    bottom.set_xlim(-0.5, writes - 0.5)
    return fig


def _token_label(token: str, width: int = 12) -> str:
    label = repr(str(token))[1:-1]  # newlines and tabs visible
    return label if len(label) <= width else label[: width - 1] + "…"


# -- Pareto -----------------------------------------------------------------------------------------------
def _records(results) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Records and the reference record from a ``gsq-hf eval --json`` payload (or its path), a list of dicts or
    results."""
    reference = None
    if isinstance(results, (str, Path)):
        results = json.loads(Path(results).read_text())
    if isinstance(results, Mapping):
        reference = results.get("reference")
        results = results["results"]
    records = [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in results]
    return records, reference


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def is_uniform(record: Mapping[str, Any]) -> bool:
    """Whether a record's config stores every unit in one format (a static policy)."""
    if record.get("policy") is not None:
        return record["policy"] == STATIC_POLICY
    fractions = record.get("format_fractions")
    if fractions:  # older records: a static policy writes one format (plus the fp32 fallback)
        return len([name for name in fractions if name != "fp32_fallback"]) == 1
    from .config import GSQConfigError, resolve_config

    try:
        return resolve_config(record["config"]).policy.kind == STATIC_POLICY
    except (GSQConfigError, OSError, KeyError, TypeError):
        return False


_X = {"bits": ("avg_state_bits", "average stored bits per SSM state element (bytes moved per step; scales "
                                 "included)"),
      "bytes": ("state_bytes", "state bytes allocated per sequence (SSM + conv: the memory held)")}


def label_points(ax: Axes, points: Sequence[tuple[float, float, str]], color) -> None:
    """Name each (x, y, name) point of a dashed family line; points at the same x share one label, their names
    top to bottom as the points (names drawn over each other would be unreadable)."""
    for px, group in _same_x([(name, x, y) for x, y, name in sorted(points, key=lambda p: p[0])]):
        group = sorted(group, key=lambda p: -p[2])
        ax.annotate("\n".join(name for name, _, _ in group), (px, group[0][2]), xytext=(5, 4),
                    textcoords="offset points", fontsize="x-small", color=color,
                    va="top" if len(group) > 1 else "baseline")


def _same_x(points: list) -> list[tuple[float, list]]:
    """Points sorted by x, grouped where x is equal (to 0.1%)."""
    groups: list[tuple[float, list]] = []
    for point in points:
        if groups and math.isclose(groups[-1][0], point[1], rel_tol=1e-3):
            groups[-1][1].append(point)
        else:
            groups.append((point[1], [point]))
    return groups


def pareto(
    results,
    *,
    x: str = "bits",
    y: str = "perplexity",
    reference: Mapping[str, Any] | float | None = None,
    logy: bool | None = None,
    title: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (7.0, 4.5),
) -> Figure:
    """Perplexity (or its change) against the state each config stores: uniform formats as a line, dynamic
    policies as labelled points.

    Stored bits are what a decode step moves, not what the cache holds: a config that allocates clearly more
    (threshold policies keep a high-format slot for every unit) also gets a hollow marker at its allocated
    bits per element, joined by a dotted line (x = bits; `gsq_hf.eval.report.allocated_bits`, from records
    with the SSM byte counts). ``x="bytes"`` plots the allocation itself.

    ``results``: the records of ``gsq-hf eval --json`` (the whole payload, or its ``results`` list), or
    `PerplexityResult` objects; failed records are left out. ``x``: ``"bits"`` (average stored bits per state
    element) or ``"bytes"`` (state bytes per sequence). ``y``: ``"perplexity"`` or ``"delta"`` (relative change
    vs the first config, in %). ``reference``: the unpatched model's record or perplexity, drawn as a dashed
    line (taken from the payload when there is one; y = perplexity only). ``logy``: log-scale perplexity
    (default: when the values span more than a factor 3).
    """
    from .eval.report import allocated_bits, over_allocated

    if x not in _X:
        raise ValueError(f"x must be one of {', '.join(_X)}, got {x!r}")
    if y not in ("perplexity", "delta"):
        raise ValueError(f"y must be 'perplexity' or 'delta', got {y!r}")
    records, payload_reference = _records(results)
    reference = payload_reference if reference is None else reference
    x_key, x_label = _X[x]
    base = next((r.get("perplexity") for r in records[:1]), None)

    def y_of(record) -> float | None:
        ppl = record.get("perplexity")
        if not _finite(ppl):
            return None
        if y == "perplexity":
            return float(ppl)
        return 100.0 * (ppl / base - 1.0) if _finite(base) and base else None

    points = [(r, float(r[x_key]), y_of(r)) for r in records
              if not r.get("error") and _finite(r.get(x_key)) and y_of(r) is not None]
    if not points and ax is None:
        raise ValueError(f"nothing to plot: no record has a finite perplexity and {x_key!r} ({len(records)} "
                         "records; failed configs are left out)")
    if ax is None:
        fig = _figure(figsize=figsize, layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.figure

    uniform = sorted((p for p in points if is_uniform(p[0])), key=lambda p: p[1])
    dynamic = [p for p in points if not is_uniform(p[0])]
    if uniform:
        ax.plot([p[1] for p in uniform], [p[2] for p in uniform], "o-", color="tab:blue", linewidth=1.5,
                markersize=6, label="uniform formats", zorder=2)
        for px, group in _same_x(uniform):  # e.g. bf16 and fp16 both store 16 bits: one label
            ax.annotate(" / ".join(r["config"] for r, _, _ in group), (px, min(py for _, _, py in group)),
                        xytext=(0, -14), textcoords="offset points", ha="center", fontsize="small", color="tab:blue")
    allocated = []  # (x, y) of the allocated bits per element, where they clearly exceed the stored bits
    for i, (record, px, py) in enumerate(dynamic):
        marker, color = _DYNAMIC_STYLES[i % len(_DYNAMIC_STYLES)]
        ax.scatter([px], [py], marker=marker, s=60, color=color, edgecolors="black", linewidths=0.5,
                   label=record["config"], zorder=3)
        ax.annotate(record["config"], (px, py), xytext=(6, 5), textcoords="offset points", fontsize="small",
                    color=color)
        if x == "bits" and over_allocated(record):
            allocated.append((allocated_bits(record), py))
            ax.plot([px, allocated[-1][0]], [py, py], ":", color=color, linewidth=1, zorder=2)
            ax.scatter([allocated[-1][0]], [py], marker=marker, s=60, facecolors="none", edgecolors=color,
                       linewidths=1.2, label="_allocated", zorder=3)
    if allocated:  # one legend entry for all hollow markers
        ax.scatter([], [], marker="o", s=60, facecolors="none", edgecolors="0.3",
                   label="hollow: bits allocated per element (memory held)")

    ref_ppl = reference.get("perplexity") if isinstance(reference, Mapping) else reference
    if y == "perplexity" and _finite(ref_ppl):
        ax.axhline(ref_ppl, color="0.5", linestyle="--", linewidth=1, label=f"unpatched reference ({ref_ppl:.3f})",
                   zorder=1)
    if y == "delta" and records:
        ax.axhline(0.0, color="0.5", linestyle="--", linewidth=1, label=f"{records[0]['config']} (Δ = 0)", zorder=1)

    values = [p[2] for p in points] + ([ref_ppl] if y == "perplexity" and _finite(ref_ppl) else [])
    if logy is None:
        logy = y == "perplexity" and bool(values) and min(values) > 0 and max(values) / min(values) > 3
    if logy:
        ax.set_yscale("log")
    if x == "bits" and points:
        ax.set_xscale("log", base=2)
        xs = [p[1] for p in points] + [a[0] for a in allocated]
        ticks = sorted({2 ** k for k in range(0, 7) if min(xs) / 1.5 <= 2 ** k <= 1.5 * max(xs)}
                       | {round(p[1], 1) for p in uniform})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    if x == "bytes":
        ax.xaxis.set_major_formatter("{x:,.0f}")
    ax.margins(x=0.08, y=0.15)
    ax.set_xlabel(x_label)
    first = records[0]["config"] if records else "first config"
    ax.set_ylabel("perplexity" if y == "perplexity" else f"Δ perplexity vs {first} (%)")
    ax.set_title(title or "what each state config costs for the state it stores")
    ax.grid(True, alpha=0.3)
    if points:
        ax.legend(fontsize="small", loc="best")
    return fig


# -- one line per family ---------------------------------------------------------------------------------
def families(
    records: Sequence[Mapping[str, Any]],
    *,
    y: str,
    y_label: str | None = None,
    uniform_family: str = "uniform",
    baseline: str | None = None,
    symlog: float | None = None,
    title: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (8.0, 5.0),
) -> Figure:
    """A metric against the average stored bits, one line per policy family.

    ``records``: dicts with ``family``, ``config``, ``avg_state_bits`` and the ``y`` key (records without a
    finite value, or with an ``error``, are left out). The ``uniform_family`` line is solid blue with each
    config named (configs storing the same bits share a label); every other family is a dashed line in its
    own colour, each point annotated with its knob (the part of the config name after ``@``). ``baseline``:
    the label of a dashed y = 0 line (e.g. ``"fp32"`` when y is a loss or change vs fp32). The x axis is
    log2; ``symlog``: a symmetric-log y axis, linear within ±``symlog``, once some |y| exceeds 10 x it (small
    losses stay readable beside int2's).
    """
    points = [r for r in records if not r.get("error") and _finite(r.get("avg_state_bits")) and _finite(r.get(y))]
    if not points and ax is None:
        keys = sorted(set().union(*(r.keys() for r in records))) if records else []
        raise ValueError(f"nothing to plot: no record has a finite 'avg_state_bits' and {y!r} (keys: "
                         f"{', '.join(keys) or 'no records'})")
    if ax is None:
        fig = _figure(figsize=figsize, layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.figure
    if baseline is not None:
        ax.axhline(0.0, color="0.5", linestyle="--", linewidth=1, label=f"{baseline} (0)", zorder=1)
    styles = itertools.cycle(_DYNAMIC_STYLES)
    for family in dict.fromkeys(r["family"] for r in points):
        line = sorted(((float(r["avg_state_bits"]), float(r[y]), r) for r in points if r["family"] == family),
                      key=lambda p: p[0])
        xs, ys = [p[0] for p in line], [p[1] for p in line]
        if family == uniform_family:
            ax.plot(xs, ys, "o-", color="tab:blue", linewidth=1.5, markersize=6, label=family, zorder=2)
            for px, group in _same_x([(p[2], p[0], p[1]) for p in line]):
                ax.annotate(" / ".join(r["config"] for r, _, _ in group), (px, min(py for _, _, py in group)),
                            xytext=(0, -14), textcoords="offset points", ha="center", fontsize="small",
                            color="tab:blue")
            continue
        marker, color = next(styles)
        ax.plot(xs, ys, marker=marker, linestyle="--", color=color, linewidth=1.2, label=family, zorder=3)
        label_points(ax, [(px, py, str(record["config"]).split("@")[-1]) for px, py, record in line], color)
    if points:
        bits = [float(r["avg_state_bits"]) for r in points]
        ax.set_xscale("log", base=2)
        ticks = sorted({2 ** k for k in range(0, 7) if min(bits) / 1.5 <= 2 ** k <= 1.5 * max(bits)})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.legend(fontsize="small", loc="best")
        if symlog and max(abs(float(r[y])) for r in points) > 10 * symlog:
            ax.set_yscale("symlog", linthresh=symlog)
    ax.margins(x=0.08, y=0.15)
    ax.set_xlabel(_X["bits"][1])
    ax.set_ylabel(y_label or y)
    ax.set_title(title or f"{y_label or y} vs stored state bits")
    ax.grid(True, alpha=0.3)
    return fig


# -- by position ------------------------------------------------------------------------------------------
def by_position(
    results,
    *,
    title: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (8.0, 4.5),
    linear_pct: float = 0.01,
    metric: str = "delta",
) -> Figure:
    """Δ perplexity vs the first record per position bucket, one line per config: does a quantized state's
    error accumulate along a stream? ``metric="kl"``: each record's mean KL vs the reference per bucket
    (``position_buckets["kl_divergence"]``, scored with ``reference=``; log y axis, error bars from
    ``["kl_stderr"]`` where present) instead of Δ perplexity.

    ``results``: records (dicts or `PerplexityResult`) with ``position_buckets``, from
    ``decode_faithful_perplexity(..., position_buckets=...)`` on the same windows; the first is the baseline
    (e.g. fp32) and must have succeeded; failed records are left out. Uniform formats are solid blue lines
    (darker: later in ``results``), dynamic policies dashed in other colours; a record's
    ``position_buckets["delta_stderr"]`` (fractions, as `scripts/results.py` adds) is drawn as error bars. The
    y axis is symmetric-log
    (linear within ±``linear_pct``) once some |Δ| exceeds 100 x ``linear_pct``, so that near-lossless
    formats and int4 both stay readable.
    """
    from matplotlib import colormaps

    from .eval.perplexity import bucket_labels

    if metric not in ("delta", "kl"):
        raise ValueError(f"metric must be 'delta' or 'kl', got {metric!r}")
    records, _ = _records(results)
    if not records or records[0].get("error") or not records[0].get("position_buckets"):
        raise ValueError("the first record is the baseline: it needs position_buckets and no error")
    base = records[0]["position_buckets"]
    labels = bucket_labels(base["starts"], base["ends"])
    if ax is None:
        fig = _figure(figsize=figsize, layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.figure
    kept = [r for r in records[1:] if not r.get("error") and r.get("position_buckets")]
    if metric == "kl":
        lines = [(r, kl) for r in kept if (kl := r["position_buckets"].get("kl_divergence")) and min(kl) > 0]
        error_key, error_scale = "kl_stderr", 1.0
    else:
        ax.axhline(0.0, color="0.5", linestyle="--", linewidth=1, label=f"{records[0]['config']} (Δ = 0)", zorder=1)
        lines = [(r, [100.0 * (p / q - 1.0) for p, q in zip(r["position_buckets"]["perplexity"], base["perplexity"],
                                                             strict=True)]) for r in kept]
        error_key, error_scale = "delta_stderr", 100.0
    uniform = [line for line in lines if is_uniform(line[0])]
    dynamic = [line for line in lines if not is_uniform(line[0])]
    shades = colormaps["Blues"](torch.linspace(0.4, 1.0, len(uniform)).tolist())
    styles = [("o", "-", color, 2) for color in shades] + [
        (marker, "--", color, 3) for (marker, color), _ in zip(itertools.cycle(_DYNAMIC_STYLES), dynamic)]
    for (record, deltas), (marker, linestyle, color, zorder) in zip(uniform + dynamic, styles, strict=True):
        ax.plot(range(len(deltas)), deltas, marker=marker, linestyle=linestyle, color=color, linewidth=1.3,
                label=record["config"], zorder=zorder)
        stderr = record["position_buckets"].get(error_key)
        if stderr:
            ax.errorbar(range(len(deltas)), deltas, yerr=[error_scale * e for e in stderr], fmt="none",
                        ecolor=color, elinewidth=0.8, capsize=2, zorder=zorder)
    if metric == "kl":
        if lines:
            ax.set_yscale("log")
        ax.set_ylabel(f"KL({records[0]['config']} ‖ config), nats per token")
    else:
        if max((abs(d) for _, deltas in lines for d in deltas), default=0.0) > 100 * linear_pct:
            ax.set_yscale("symlog", linthresh=linear_pct)
        ax.set_ylabel(f"Δ perplexity vs {records[0]['config']} (%)")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("positions within the stream (scored tokens)")
    ax.set_title(title or "error by position along the stream")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig
