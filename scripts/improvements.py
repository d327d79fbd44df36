"""Why the dynamic policies do not beat uniform quantization, and the obvious improvements (results issue, point 4).

    python scripts/improvements.py --num 256 --threads 1 --out docs/      # 17 minutes on one core
    python scripts/improvements.py --lines "uniform-sr,finer groups" --num 64 --out /tmp/improvements

Measured on the committed recall models (``gsq_hf/assets/recall-*``): a state that loses a key-value binding
fails a query, so recall separates state formats that perplexity on the CPU reference models (close to a
unigram model) cannot. Every sequence runs with every state write through the config (`recall_sweep`: chunked
forwards where that is faithful, one token per forward for entropy policies), ``--num`` sequences at the
training gap and at 4x it.

Part 1, the signals (``--signal-num`` sequences at 4x the training gap, fp32 decode, every SSM write seen):
the gate's distribution; each unit's round-trip error at int4/int3 (nearest rounding, one absmax scale per
row along d_state); the rank correlation of the gate with that error (does the gate point where the error
is?); and each element's change per step in quantization steps of its row: under 0.01 step the codes of a
state on the grid stay right under round-to-nearest (a rescale), from 0.01 to 0.5 step round-to-nearest
drops the change (the *dead band*).

Part 2, the improvements, each a line of configs compared at equal average stored bits with the two static
fronts, uniform round-to-nearest and uniform stochastic rounding (interpolated linearly in bits; "better"
only by more than 2 binomial standard errors of the difference); a line moves the front only by beating each
front that covers its bits:

* stochastic rounding (``rounding: stochastic``) of the uniform formats (against round-to-nearest only);
* the dynamic policies with stochastic rounding;
* finer groups along d_state (``group_size``).

Every config is a `GSQConfig`; the signals are read from the cache between one-token forwards (`read_ssm`,
``last_gate``): nothing in the package is replaced. Dropped from the earlier run (docs/improvements.md records
it): per-state-dimension scales (a scale axis the formats do not offer) and budget policies ranked by a unit's
round-trip error or crest factor (a signal the policies cannot read yet); both lost to the uniform fronts.

Not built, with the reason in docs/improvements.md: scale reuse while the gate stays closed and error feedback.

Writes ``improvements.md``, ``improvements.json`` and ``improvements-<model>.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gsq_hf import patched, plot
from gsq_hf.cache import GSQCache
from gsq_hf.cli.common import run_script
from gsq_hf.config import resolve_config
from gsq_hf.eval.data import EvalInputError, load_model
from gsq_hf.eval.recall import generate_mqar, load_recall_spec, read_recall_info, recall_sweep
from gsq_hf.eval.report import versions, write_json
from gsq_hf.eval.stepping import next_token_logits
from gsq_hf.eval.sweep import default_recall_models, model_name, recall_records
from gsq_hf.eval.verdict import interpolate_front
from gsq_hf.formats import StateFormat, get_format

NEAREST, SR = "uniform", "uniform-sr"
N_SE = 2.0  # "better" = more than this many standard errors of the difference
GATE_THRESHOLDS = (0.02, 0.1, 0.3)


# -- part 1: the signals ----------------------------------------------------------------------------------
def unit_error(state: torch.Tensor, fmt: StateFormat, group: int) -> torch.Tensor:
    """(batch, units): the L2 round-trip error of each unit's state at ``fmt`` (nearest rounding)."""
    return (fmt.roundtrip(state, group) - state).flatten(2).norm(dim=-1)


SIGNAL_FORMATS = ("int4", "int3")
STILL = 0.01  # a change of less than this many quantization steps counts as none


def in_steps(state: torch.Tensor, fmt: StateFormat) -> torch.Tensor:
    """``state`` in quantization steps of its row (one absmax scale per row along d_state)."""
    return state / (state.abs().amax(-1, keepdim=True) / fmt.max_code).clamp_min(1e-30)


class SignalObserver:
    """Statistics of every SSM write after a layer's first: the gate per unit, each unit's relative round-trip
    error at `SIGNAL_FORMATS`, and each element's change in one step measured in quantization steps of its row
    (``|h_t / s_t - h_{t-1} / s_{t-1}|`` with ``s`` = the row's absmax / max code): below `STILL` the codes of a
    state on the grid stay right under round-to-nearest (a pure rescale: Mamba2's scalar decay); between `STILL`
    and half a step round-to-nearest drops a real change (the dead band); above, it is kept."""

    def __init__(self):
        self.previous: dict[int, torch.Tensor] = {}
        self.gates: list[torch.Tensor] = []
        self.errors: dict[str, list[torch.Tensor]] = {f: [] for f in SIGNAL_FORMATS}
        self.still = dict.fromkeys(SIGNAL_FORMATS, 0)
        self.band = dict.fromkeys(SIGNAL_FORMATS, 0)
        self.elements = 0

    def observe(self, layer, state: torch.Tensor, gate: torch.Tensor | None) -> None:
        state = state.detach().float()
        before, self.previous[id(layer)] = self.previous.get(id(layer)), state
        if before is None or before.shape != state.shape or gate is None:
            return
        self.gates.append(gate.detach().float().flatten())
        norm = state.flatten(2).norm(dim=-1).clamp_min(1e-30)
        for name in SIGNAL_FORMATS:
            fmt = get_format(name)
            self.errors[name].append((unit_error(state, fmt, state.shape[-1]) / norm).flatten())
            change = (in_steps(state, fmt) - in_steps(before, fmt)).abs()
            self.still[name] += int((change < STILL).sum())
            self.band[name] += int(((change >= STILL) & (change < 0.5)).sum())
        self.elements += state.numel()

    def summary(self) -> dict[str, Any]:
        gate = torch.cat(self.gates)
        stats = {"unit_writes": gate.numel(),
                 "gate_quantiles": {q: float(gate.quantile(q)) for q in (0.1, 0.5, 0.9)},
                 "gate_open_fraction": {t: float((gate >= t).float().mean()) for t in GATE_THRESHOLDS}}
        for name, parts in self.errors.items():
            err = torch.cat(parts)
            stats[f"{name}_relative_error_median"] = float(err.median())
            stats[f"{name}_relative_error_p90"] = float(err.quantile(0.9))
            stats[f"{name}_gate_error_spearman"] = spearman(gate, err)
            stats[f"{name}_still_fraction"] = self.still[name] / self.elements
            stats[f"{name}_dead_band_fraction"] = self.band[name] / self.elements
        return stats


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two 1-D tensors (ties broken by position)."""
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


def signal_statistics(model, spec, gap: int, num: int) -> dict[str, Any]:
    """Part 1 on ``num`` sequences at ``gap`` (seed 1: not the scored ones), fp32 storage with the gate computed."""
    batch = generate_mqar(replace(spec, gap=gap), num, seed=1)
    config = resolve_config({"name": "fp32-gate", "policy": "gate", "low_format": "fp32", "high_format": "fp32"})
    observer = SignalObserver()
    with patched(model, config), torch.no_grad():
        cache = GSQCache(model, config)
        for _ in next_token_logits(model, batch.input_ids[:, :-1], cache, stepped=True):  # one write per layer
            for layer in cache.gsq_layers:  # fp32 storage: what was read back is the state written
                observer.observe(layer, layer.read_ssm(), layer.last_gate)
    return {"gap": gap, "sequences": num, **observer.summary()}


# -- part 2: the improvements -----------------------------------------------------------------------------
def static(name: str, fmt: str, **extra) -> dict[str, Any]:
    return {"name": name, "policy": "static", "format": fmt, **extra}


def dynamic(name: str, policy: str, **extra) -> dict[str, Any]:
    return {"name": name, "policy": policy, "low_format": "int3", "high_format": "int8", **extra}


UNIFORM_FORMATS = ("int8", "int6", "int5", "int4", "int3", "int2")
SR_ARGS = {"rounding": "stochastic"}

# (line, configs): uniform is the round-to-nearest front, uniform-sr the stochastic-rounding one; every other
# line is compared with both (a line "moves the front" only by beating each that covers its bits)
EXPERIMENTS: list[tuple[str, list[dict[str, Any]]]] = [
    (NEAREST, [static("fp32", "fp32")] + [static(f, f) for f in UNIFORM_FORMATS]),
    (SR, [static(f"{f}-sr", f, **SR_ARGS) for f in UNIFORM_FORMATS]),
    ("finer groups", [static("int3-g16", "int3", group_size=16), static("int3-g8", "int3", group_size=8),
                      static("int2-g8", "int2", group_size=8)]),
    ("gate-closed int3/int8 sr", [dynamic(f"gate-closed-sr@{t}", "gate", threshold=t, high_when="closed", **SR_ARGS)
                                  for t in GATE_THRESHOLDS]),
    ("gate-open int3/int8 sr", [dynamic(f"gate-open-sr@{t}", "gate", threshold=t, high_when="open", **SR_ARGS)
                                for t in GATE_THRESHOLDS]),
    ("entropy int3/int8 sr", [dynamic(f"entropy-sr@{t}", "entropy", threshold=t, **SR_ARGS) for t in (0.25, 0.5)]),
]
LINES = [line for line, _ in EXPERIMENTS]


def select_lines(names: str | None) -> list[str]:
    """The lines of ``names`` (comma-separated; None: all) in `EXPERIMENTS` order, the uniform line always."""
    if names is None:
        return list(LINES)
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in LINES]
    if unknown:
        raise SystemExit(f"--lines: unknown {', '.join(map(repr, unknown))}; known: {', '.join(LINES)}")
    return [line for line in LINES if line == NEAREST or line in chosen]


def run_experiments(model, spec, gaps: list[int], num: int, batch_size: int, name: str,
                    lines: list[str] | None = None) -> list[dict[str, Any]]:
    """The ``lines`` (default: all) of `EXPERIMENTS` on one model: recall records with ``family`` = the line."""
    records: list[dict[str, Any]] = []
    for line, configs in EXPERIMENTS:
        if lines is None or line in lines:
            sweep = recall_sweep(model, spec, configs, gaps, num, batch_size=batch_size)
            records += recall_records(sweep, [line] * len(configs), name)
    fp32 = records[0]
    for r in records:
        r["delta_vs_fp32"] = r["recall"] - fp32["recall"]
        r["recall_loss_points"] = -100.0 * r["delta_vs_fp32"]
    return records


def references(line: str) -> tuple[str, ...]:
    return () if line == NEAREST else (NEAREST,) if line == SR else (NEAREST, SR)


def compare(records: list[dict[str, Any]], gap: str | None) -> list[dict[str, Any]]:
    """Each record not on the nearest line vs its reference lines interpolated at its bits (None: all gaps):
    ``{"config", "line", "bits", "recall", "versus": {line: {"reference", "gain", "noise", "better"}},
    "front"}``; ``front``: better than every reference line that covers its bits (None: none covers them)."""
    def point(r):
        g = r if gap is None else r["by_gap"][gap]
        return g["avg_state_bits"], g["recall"], g["recall_stderr"]

    curves = {line: sorted((point(r) for r in records if r["family"] == line), key=lambda p: (p[0], -p[1]))
              for line in (NEAREST, SR)}
    out = []
    for r in records:
        if r["family"] == NEAREST:
            continue
        bits, value, se = point(r)
        versus = {}
        for line in references(r["family"]):
            curve = interpolate_front(curves[line], bits)
            if curve is not None:
                gain, noise = value - curve[0], N_SE * math.hypot(se, curve[1])
                versus[line] = {"reference": curve[0], "gain": gain, "noise": noise, "better": gain > noise}
        out.append({"config": r["config"], "line": r["family"], "bits": bits, "recall": value, "versus": versus,
                    "front": all(v["better"] for v in versus.values()) if versus else None})
    return out


# -- report -----------------------------------------------------------------------------------------------
def _versus(c: dict[str, Any] | None, line: str) -> str:
    if c is None or line not in references(c["line"]):
        return ""
    v = c["versus"].get(line)
    if v is None:
        return "outside its bits"
    return f"{100 * v['gain']:+.2f} (noise {100 * v['noise']:.2f})" + (" **better**" if v["better"] else "")


def table(records: list[dict[str, Any]], comparisons: list[dict[str, Any]], gaps: list[int]) -> str:
    by_config = {c["config"]: c for c in comparisons}
    headers = ["config", "line", "avg bits", *(f"gap {g} %" for g in gaps), "recall %", f"vs {NEAREST}",
               f"vs {SR}"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(headers) - 2)) + "|"]
    for r in records:
        c = by_config.get(r["config"])
        cells = [r["config"], r["family"], f"{r['avg_state_bits']:.2f}",
                 *(f"{100 * r['recall_by_gap'][str(g)]:.2f}" for g in gaps), f"{100 * r['recall']:.2f}",
                 _versus(c, NEAREST), _versus(c, SR)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def signals_table(stats: dict[str, dict[str, Any]]) -> str:
    rows = [("units per write", lambda s: f"{s['unit_writes']:,} unit-writes"),
            ("gate 10% / 50% / 90% quantiles", lambda s: " / ".join(f"{v:.3f}" for v in s["gate_quantiles"].values())),
            *[(f"fraction of unit-writes with gate ≥ {t}", lambda s, t=t: f"{100 * s['gate_open_fraction'][t]:.1f}%")
              for t in GATE_THRESHOLDS]]
    for fmt in ("int4", "int3"):
        rows += [(f"{fmt} relative round-trip error per unit, median / 90%",
                  lambda s, f=fmt: f"{s[f'{f}_relative_error_median']:.3f} / {s[f'{f}_relative_error_p90']:.3f}"),
                 (f"rank correlation gate ~ {fmt} error", lambda s, f=fmt: f"{s[f'{f}_gate_error_spearman']:+.3f}"),
                 (f"{fmt}: elements changing by < {STILL} step (nearest keeps them exactly)",
                  lambda s, f=fmt: f"{100 * s[f'{f}_still_fraction']:.1f}%"),
                 (f"{fmt} dead band: elements changing by {STILL} to 0.5 step (nearest drops the change)",
                  lambda s, f=fmt: f"{100 * s[f'{f}_dead_band_fraction']:.1f}%")]
    names = list(stats)
    lines = ["| signal | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += ["| " + label + " | " + " | ".join(fn(stats[n]) for n in names) + " |" for label, fn in rows]
    return "\n".join(lines)


def verdict(name: str, comparisons: list[dict[str, Any]]) -> str:
    """One line per improvement: does any of its configs beat every static front covering its bits?"""
    lines = []
    for line in dict.fromkeys(c["line"] for c in comparisons):
        mine = [c for c in comparisons if c["line"] == line]
        judged = [c for c in mine if c["versus"]]
        fronts = " and ".join(references(line))
        if not judged:
            lines.append(f"- {line}: outside the bits of {fronts}")
            continue
        winners = [c for c in judged if c["front"]]
        if winners:
            listed = ", ".join(f"{c['config']} at {c['bits']:.2f} bits (" + ", ".join(
                f"{100 * v['gain']:+.2f} points vs {ln}" for ln, v in c["versus"].items()) + ")" for c in winners)
            lines.append(f"- {line}: **moves the front** beyond {fronts}: {listed}")
            continue
        best = max(judged, key=lambda c: min(v["gain"] - v["noise"] for v in c["versus"].values()))
        margins = ", ".join(f"{100 * v['gain']:+.2f} vs {ln} (noise {100 * v['noise']:.2f})"
                            for ln, v in best["versus"].items())
        lines.append(f"- {line}: does not move the front of {fronts} (closest: {best['config']} at "
                     f"{best['bits']:.2f} bits: {margins} points)")
    return f"**{name}, all gaps pooled:**\n\n" + "\n".join(lines)


def summary(models: list[dict[str, Any]]) -> str:
    """One line per model: the lines that move a front (with their largest gain), or that none does."""
    out = []
    for m in models:
        moving = {}
        for c in m["comparisons"]:
            if c["front"]:
                gain = min(v["gain"] for v in c["versus"].values())
                if gain > moving.get(c["line"], (None, -math.inf))[1]:
                    moving[c["line"]] = (c, gain)
        if moving:
            listed = "; ".join(f"{line} (up to {100 * gain:+.2f} points at equal bits: {c['config']}, "
                               f"{100 * c['recall']:.2f}% at {c['bits']:.2f} bits, beyond "
                               f"{' and '.join(c['versus'])})" for line, (c, gain) in moving.items())
            out.append(f"- {m['model']}: **moves the front**: {listed}.")
        else:
            out.append(f"- {m['model']}: nothing moves the front; every line is within noise of or below the "
                       "uniform formats at equal bits.")
    return "\n".join(out)


NOT_BUILT = """Not built:

- *Scale reuse while the gate stays closed* (re-quantize with the previous scale, so an unchanged state is
  stored unchanged): with round-to-nearest and one absmax scale per row, re-quantizing a state that is already
  on the grid returns the same codes whenever the row keeps its absmax, so the only error reuse could remove is
  the re-scaling when the absmax decays. For Mamba2 the decay is one scalar per head, so h ← a·h moves every
  value of a row and its absmax together and the codes are already unchanged: reuse is a no-op. For Mamba the
  decay differs along d_state; there the loss is the dead band above (changes smaller than half a step are
  dropped), which a kept scale does not remove either. Stochastic rounding is what addresses that loss.
- *Error feedback* (carry each step's rounding residual into the next write): the residual is a second state
  tensor of the same shape that must be stored between steps, which costs more bytes than a finer format;
  stochastic rounding is its stateless counterpart (unbiased on average), measured above."""


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-") or "x"


def gap_list(text: str) -> list[int]:
    """``--gaps``: positive integers, comma-separated."""
    try:
        gaps = [int(g) for g in text.split(",")]
    except ValueError:
        gaps = []
    if not gaps or min(gaps) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers, comma-separated (e.g. 32,128)")
    return gaps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="recall model dir (repeatable; default: assets/recall-*)")
    parser.add_argument("--num", type=int, default=256, help="sequences per gap (default 256)")
    parser.add_argument("--gaps", type=gap_list, help="comma-separated gaps (default: the training gap and 4x it)")
    parser.add_argument("--signal-num", type=int, default=64, help="sequences for part 1 (default 64)")
    parser.add_argument("--lines", help=f"comma-separated lines to run (default: all): {', '.join(LINES)}")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num < 1 or args.signal_num < 1:
        parser.error("--num and --signal-num must be >= 1")
    lines = select_lines(args.lines)
    command = "python scripts/improvements.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    payload: dict[str, Any] = {"command": command, "versions": versions(), "num": args.num, "models": []}
    stats: dict[str, dict[str, Any]] = {}
    sections: list[str] = []
    for directory in args.model or default_recall_models():
        name = model_name(directory)
        try:
            spec = load_recall_spec(directory)
            model = load_model(directory, "fp32", "cpu")
        except EvalInputError as error:  # not a recall model: say so, without a traceback
            raise SystemExit(f"--model {directory}: {error}") from None
        gaps = args.gaps or [spec.gap, 4 * spec.gap]
        stats[name] = signal_statistics(model, spec, max(gaps), args.signal_num)
        records = run_experiments(model, spec, gaps, args.num, args.batch_size, name, lines)
        comparisons = compare(records, None)
        by_gap = {str(g): compare(records, str(g)) for g in gaps}
        fig = plot.families(records, y="recall_loss_points", y_label="recall loss vs fp32 (points)",
                            baseline="fp32", symlog=1.0,
                            title=f"{name}: the improvements (gaps {', '.join(map(str, gaps))}, {args.num} seqs each)")
        plot.save(fig, args.out / f"improvements-{slug(name)}.png")
        info = read_recall_info(directory)
        payload["models"].append({"model": name, "directory": str(directory), "gaps": gaps, "task": vars(spec),
                                  "recall_fp32_trained": info.get("recall_fp32"), "signals": stats[name],
                                  "records": records, "comparisons": comparisons, "comparisons_by_gap": by_gap})
        sections += [f"## {name}", "",
                     f"{spec.pairs} pairs, {spec.queries} queries per sequence, gaps {', '.join(map(str, gaps))}, "
                     f"{args.num} sequences per gap ({records[0]['queries']} queries per config).", "",
                     table(records, comparisons, gaps), "", verdict(name, comparisons), "",
                     f"![improvements](improvements-{slug(name)}.png)", ""]
    seconds = time.perf_counter() - started
    md = ["# Why the dynamic policies lose, and the obvious improvements", "",
          "Generated by `scripts/improvements.py` (point 4 of the results issue); every number is computed by it.",
          "", "```", command, "```", "",
          "Versions: " + ", ".join(f"{k} {v}" for k, v in payload["versions"].items()) + ".", "",
          "Recall is decode-faithful (every state write through the config) on the committed MQAR models; "
          "'vs its reference line' is the recall minus that line's, linearly interpolated at the same average "
          f"stored bits, in points; **better** = by more than {N_SE:g} binomial standard errors of the difference "
          "(add-one estimate). Avg bits include the fp32 scales.", "",
          "## What moves the front (all gaps pooled)", "", summary(payload["models"]), "",
          "## The signals", "",
          f"fp32 decode, `--signal-num {args.signal_num}` sequences at the larger gap, every SSM write after the "
          "first of each layer; round-trip errors with one absmax scale per row along d_state (as stored).", "",
          signals_table(stats), "", *sections, NOT_BUILT, "", f"Total time: {seconds:.0f} s."]
    (args.out / "improvements.md").write_text("\n".join(md) + "\n")
    payload["seconds"] = seconds
    write_json(args.out / "improvements.json", payload)
    print("\n".join(md))
    return payload


if __name__ == "__main__":
    run_script(main)
