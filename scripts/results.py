"""The results report: docs/results.md and its plots from a `gsq-hf sweep` run (every number computed by it).

    python scripts/results.py                                   # built-in model; wikitext-2, PTB, LAMBADA tests
    python scripts/results.py --model runs/ref-mamba-cpu-bpe --model runs/ref-mamba2-cpu-bpe --max-tokens 4096 \
        --lambada-examples 100 --long-stream-tokens 16384 --long-stream-streams 2 --recall-num 256 --out docs/
    python scripts/results.py --dataset builtin --max-tokens 1024 --out /tmp/results_check
    python scripts/results.py --from-json docs/results.json --out docs/   # rewrite the report only

The run is `gsq_hf.eval.sweep.run_sweep` (the options are ``gsq-hf sweep``'s; see its module docstring for the
grid, LAMBADA, long streams and recall); the verdicts are `gsq_hf.eval.verdict`'s numbers. This script only
writes them down: ``results.md`` (one table per model and dataset, the verdicts and the issue's questions as
sentences, the command line and versions on top), ``results.json`` (the sweep's payload),
``pareto-<model>-<dataset>.png`` (Δ perplexity and KL vs average stored bits, one line per family: the uniform
and the composed fronts, each dynamic family), ``trace-<model>.png``, ``long-stream[-kl]-<model>.png`` and
``recall-pareto-<model>.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gsq_hf import plot
from gsq_hf.cli.common import run_script
from gsq_hf.cli.sweep import sweep_arguments, sweep_options
from gsq_hf.errors import GSQConfigError, UnsupportedModelError
from gsq_hf.eval.data import EvalInputError
from gsq_hf.eval.perplexity import bucket_labels
from gsq_hf.eval.report import write_json
from gsq_hf.eval.sweep import COMPOSED, UNIFORM, run_sweep, sweep_size
from gsq_hf.eval.verdict import (
    GROWTH_PP,
    KL_SE,
    PPL_MARGIN_PP,
    PPL_SE,
    RECALL_SE,
    has_paired_stderr,
    kl_growth,
    stream_growth,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_DATASETS = [str(DATA / "wikitext-2-raw" / "wiki.test.raw"), str(DATA / "ptb" / "ptb.test.txt"),
                    str(DATA / "lambada" / "lambada_test.jsonl")]
# The seeds' rules as the grid holds them (tests check they equal the presets): the GSQ note's "gate-closed
# states in int8, open ones in fp16" and the entropy note's "low-entropy tokens in 4-bit states".
SEED_CONFIGS = {"gsq-gate": "gate-open@0.3", "gsq-entropy": "entropy@0.5"}
SEED_BANDWIDTH_CLAIM = 0.25  # the entropy note: "reduce average memory bandwidth by 25%"
# What a real checkpoint of the mamba-130m shape reaches (300B Pile tokens), for scale next to the models trained
# here: Gu & Dao 2023 (arXiv:2312.00752), Table 3. They report no WikiText-2 perplexity.
PUBLISHED_MAMBA_130M = "LAMBADA last-word accuracy 44.3%, perplexity 16.07; Pile validation perplexity 10.56"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-") or "x"


def _f(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _pct(delta, stderr=math.nan) -> str:
    """``+1.234%``, or ``+1.234 ± 0.056%`` with a standard error (None or NaN: none)."""
    if not (isinstance(delta, float) and math.isfinite(delta)):
        return "-"
    known = isinstance(stderr, float) and math.isfinite(stderr)
    return f"{100 * delta:+.3f}" + (f" ± {100 * stderr:.3f}%" if known else "%")


def _kl(value, stderr=math.nan) -> str:
    """``1.23e-04``, or ``1.23e-04 ± 5.6e-06`` with a standard error."""
    if not (isinstance(value, float) and math.isfinite(value)):
        return "-"
    return f"{value:.2e}" + (f" ± {stderr:.1e}" if isinstance(stderr, float) and math.isfinite(stderr) else "")


def has_kl(record: dict[str, Any]) -> bool:
    return not record.get("error") and isinstance(record.get("kl_divergence"), float)


def model_provenance(source: str) -> str | None:
    """One sentence on how a local model was trained, from the ``training_info.json`` its training script wrote
    (None for a hub model or a directory without one), so a reader sees how far from a real checkpoint it is."""
    path = Path(source) / "training_info.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    parts = [f"{info.get('model', 'model')}, {info['parameters'] / 1e6:.2f}M parameters"]
    if "steps" in info and "tokens_seen" in info:
        parts.append(f"trained {info['steps']} steps ({info['tokens_seen'] / 1e6:.2f}M tokens, "
                     f"{info.get('train_time_s', math.nan) / 60:.0f} min on {info.get('device', 'cpu')})")
    heldout = info.get("heldout", {}).get("loss") or (info.get("history") or [{}])[-1].get("heldout_loss")
    if heldout:
        parts.append(f"held-out loss {heldout:.3f} (perplexity {math.exp(heldout):.1f})")
    wikitext = info.get("wikitext2_test")
    if wikitext:
        parts.append(f"WikiText-2 test perplexity {wikitext['token_perplexity']:.1f} per token, "
                     f"{wikitext['word_perplexity']:.1f} per word (full-sequence, {wikitext['scored_tokens']} tokens)")
    sentence = "Model: " + "; ".join(parts) + f" (`{path.name}` in the model directory"
    commands = info.get("commands") or ([info["command"]] if info.get("command") else [])
    if commands:  # the training command (a later --resume that only saved and scored adds nothing to it)
        sentence += f"; `{commands[0]}`"
    sentence += ")."
    if wikitext:
        sentence += (f" For scale, a real mamba-130m: {PUBLISHED_MAMBA_130M} (Gu & Dao 2023, Table 3). This "
                     "model is far from converged: read its Δ perplexity as a weak signal, the recall section as the "
                     "sharper one.")
    return sentence


# -- tables -------------------------------------------------------------------------------------------
def _table(headers: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    return "\n".join(["| " + " | ".join(headers) + " |",
                      "|" + "|".join(["---"] * text_columns + ["---:"] * (len(headers) - text_columns)) + "|",
                      *("| " + " | ".join(cells) + " |" for cells in rows)])


def markdown_table(records: list[dict[str, Any]], lambada: bool) -> str:
    headers = ["config", "family", "perplexity", "word ppl", "Δ vs fp32", "KL vs fp32", "top-1 agree",
               "avg state bits", "state B/seq"]
    if lambada:
        headers[4:4] = ["LAMBADA acc", "LAMBADA ppl"]
    rows = []
    for r in records:
        if r.get("error"):
            rows.append([r["config"], r["family"], "FAILED"] + ["-"] * (len(headers) - 3))
            continue
        top1 = r.get("top1_agreement")
        cells = [r["config"], r["family"], _f(r["perplexity"], ".4f"), _f(r["word_perplexity"], ".4f"),
                 _pct(r.get("delta_vs_fp32"), r.get("delta_stderr")),
                 _kl(r.get("kl_divergence"), r.get("kl_stderr", math.nan)),
                 f"{100 * top1:.2f}%" if isinstance(top1, float) else "-",
                 _f(r.get("avg_state_bits"), ".2f"), _f(r.get("state_bytes"), ",.0f")]
        if lambada:
            cells[4:4] = [_f(r.get("lambada_accuracy"), ".4f"), _f(r.get("lambada_perplexity"), ".3f")]
        rows.append(cells)
    return _table(headers, rows)


def long_stream_table(group: list[dict[str, Any]], labels: list[str]) -> str:
    rows = []
    for r in group:
        if r.get("error") or r.get("delta_vs_fp32") is None:
            rows.append([r["config"], r["family"], "FAILED"] + ["-"] * (len(labels) + 1))
        else:
            buckets = r["position_buckets"]
            rows.append([r["config"], r["family"], _f(r.get("avg_state_bits"), ".2f"),
                         _pct(r["delta_vs_fp32"], r.get("delta_stderr")),
                         *map(_pct, buckets["delta_vs_fp32"], buckets["delta_stderr"])])
    return _table(["config", "family", "avg state bits", "all positions", *labels], rows, 2)


def long_stream_kl_table(group: list[dict[str, Any]], labels: list[str]) -> str:
    rows = []
    for r in group[1:]:
        if not has_kl(r):
            rows.append([r["config"], r["family"], "FAILED" if r.get("error") else "-"] + ["-"] * len(labels))
        else:
            buckets = r["position_buckets"]
            rows.append([r["config"], r["family"], _kl(r["kl_divergence"], r.get("kl_stderr", math.nan)),
                         *map(_kl, buckets["kl_divergence"], buckets["kl_stderr"])])
    return _table(["config", "family", "all positions", *labels], rows, 2)


def _points(delta, stderr=None) -> str:
    """A recall difference in points, ``± SE`` where its paired standard error is known."""
    known = isinstance(stderr, float) and math.isfinite(stderr)
    return f"{100 * delta:+.2f}" + (f" ± {100 * stderr:.2f}" if known else "")


def recall_table_md(records: list[dict[str, Any]], gaps: list[int]) -> str:
    rows = [[r["config"], r["family"], f"{r['avg_state_bits']:.2f}", f"{100 * r['recall']:.2f}",
             *(f"{100 * r['recall_by_gap'][str(g)]:.2f}" for g in gaps),
             _points(r["delta_vs_fp32"], r.get("delta_stderr")),
             *(_points(r["delta_by_gap"][str(g)], r.get("delta_stderr_by_gap", {}).get(str(g))) for g in gaps)]
            for r in records]
    return _table(["config", "family", "avg bits", "recall %", *(f"gap {g} %" for g in gaps), "Δ vs fp32 (points)",
                   *(f"Δ gap {g}" for g in gaps)], rows, 2)


# -- sentences ----------------------------------------------------------------------------------------
FRONT_TEXT = {UNIFORM: "the round-to-nearest uniform front", COMPOSED: "the composed-format front"}


def verdict_sentence(where: str, verdicts: list[dict[str, Any]], amount: Callable[[float], str],
                     noise_text: str, curve: str = "linearly interpolated in average bits") -> str:
    """One sentence: which configs beat the front at equal bits and by how much, or none."""
    judged = [v for v in verdicts if v["reference"] is not None]
    winners = sorted((v for v in judged if v["beats"]), key=lambda v: -v["gain"])
    outside = [v["config"] for v in verdicts if v["reference"] is None]
    front = FRONT_TEXT.get(verdicts[0]["front"] if verdicts else UNIFORM, "the front")
    listed = "; ".join(f"{v['config']} ({v['bits']:.2f} bits: {amount(v['gain'])} better than the interpolated "
                       f"front, noise {amount(v['noise'])})" for v in winners) or "none"
    best = max(judged, key=lambda v: v["gain"] - v["noise"], default=None)
    closest = ("" if winners or best is None else
               f" (closest: {best['config']}, {best['bits']:.2f} bits, {amount(best['gain'])} better vs "
               f"noise {amount(best['noise'])})")
    tail = f" No verdict outside the front's range of bits: {', '.join(outside)}." if outside else ""
    return (f"**Beats {front} at equal bits — {where}:** {listed}{closest}. {len(judged)} configs compared with "
            f"{front} {curve}; {noise_text}.{tail}")


PPL_NOISE = (f"'beats' means a Δ perplexity lower by more than {PPL_SE:g} standard errors of the difference (each "
             "Δ's paired with fp32 over the windows: both scored the same windows)")
PPL_MARGIN_NOISE = (f"'beats' means a Δ perplexity lower by more than {PPL_MARGIN_PP} percentage point (no standard "
                    "error: these records have no per-window sums)")
KL_NOISE = f"'beats' means a KL lower by more than {KL_SE:g} standard errors of the difference (each over the windows)"
RECALL_NOISE = (f"'beats' means a recall higher by more than {RECALL_SE:g} binomial standard errors of the "
                "difference (each from the add-one estimate (correct + 1) / (queries + 2))")


def dataset_verdict_sentences(where: str, verdicts: list[dict[str, Any]], paired: bool = True) -> list[str]:
    """The perplexity and KL verdict sentences of one model x dataset, each front; ``paired``: its Δ perplexity
    verdicts used paired standard errors (`has_paired_stderr`), not the fixed margin."""
    out = []
    for entry in verdicts:
        if entry["metric"] == "perplexity":
            out.append(verdict_sentence(where + " (perplexity)", entry["verdicts"], lambda x: f"{100 * x:.2f} pp",
                                        PPL_NOISE if paired else PPL_MARGIN_NOISE))
        elif entry["metric"] == "kl":
            out.append(verdict_sentence(where + " (KL vs fp32)", entry["verdicts"],
                                        lambda x: f"a factor {math.exp(x):.2f} in KL", KL_NOISE,
                                        "interpolated in average bits linearly in log KL"))
    return out


def growth_sentence(group: list[dict[str, Any]], labels: list[str]) -> str:
    """Which configs' |Δ| grows from the first position bucket to the last, with every config's numbers."""
    question = "**Does the error grow with sequence length?** "
    growth = stream_growth(group)
    if len(labels) < 2 or not growth:
        return question + ("Not measured: fewer than two position buckets (use a longer --long-stream-tokens)."
                           if any(r.get("delta_vs_fp32") is not None for r in group[1:])
                           else "Not measured: the fp32 baseline failed.")
    grows = [g["config"] for g in growth if g["grows"]]
    shrinks = [g["config"] for g in growth if g["shrinks"]]
    verdict = (f"Yes for {', '.join(grows)}" if grows else "No") + (f"; it shrinks for {', '.join(shrinks)}"
                                                                   if shrinks else "")
    if grows and len(labels) > 2:
        still = [g["config"] for g in growth if g["still_growing"]]
        verdict += f"; still growing between the last two buckets: {', '.join(still) or 'none'}"
    numbers = "; ".join(f"{g['config']} {_pct(*g['first'])} → {_pct(*g['last'])}" for g in growth)
    return (question + f"{verdict}. Growth: |Δ| rises by more than {GROWTH_PP} percentage point and more than "
            f"twice its standard error over the {group[1]['streams']} streams. Δ perplexity vs fp32 ± standard "
            f"error, positions {labels[0]} → {labels[-1]}: {numbers}.")


def kl_growth_sentence(group: list[dict[str, Any]], labels: list[str]) -> str:
    question = "**Does the divergence from fp32 grow with sequence length?** "
    growth = kl_growth(group)
    if len(labels) < 2 or not growth:
        return question + "Not measured (fewer than two position buckets, or no KL: `--kl-top-k 0`)."
    if any(g["grows"] is None for g in growth):
        verdict = "Not judged (one stream: no standard error)"
    else:
        grows = [g["config"] for g in growth if g["grows"]]
        verdict = f"It grows for {', '.join(grows)}" if grows else "No config's KL grows"
    numbers = "; ".join(f"{g['config']} {_kl(g['first'])} → {_kl(g['last'])} (x{g['last'] / g['first']:.2f})"
                        for g in growth if g["first"] > 0)
    return (question + f"{verdict}: the last bucket's KL above the first's by more than twice the standard error "
            f"of the difference over the {group[1]['streams']} streams. KL vs fp32 per token (nats), positions "
            f"{labels[0]} → {labels[-1]}: {numbers}.")


def questions_section(name: str, groups: dict[str, list[dict[str, Any]]], judged: dict[str, list[dict[str, Any]]],
                      judged_kl: dict[str, list[dict[str, Any]]] | None = None) -> list[str]:
    """The results issue's questions as sentences with this model's numbers, per dataset."""
    def find(group, config):
        return next((r for r in group if r["config"] == config and not r.get("error")), None)

    def fidelity(record):
        return (f", KL {_kl(record['kl_divergence'])} nats/token, top-1 agreement "
                f"{100 * record['top1_agreement']:.2f}%") if has_kl(record) else ""

    def lambada(record, group):
        fp32 = find(group, "fp32")
        if record.get("lambada_accuracy") is None or fp32 is None:
            return ""
        return f" (LAMBADA accuracy {100 * record['lambada_accuracy']:.1f}% vs {100 * fp32['lambada_accuracy']:.1f}%)"

    def counts(verdicts_by_dataset, amount):
        parts = []
        for d, verdicts in verdicts_by_dataset.items():
            compared = [v for v in verdicts if v["reference"] is not None]
            winners = sorted((v for v in compared if v["beats"]), key=lambda v: -v["gain"])
            best = (f" (largest: {winners[0]['config']}, {amount(winners[0]['gain'])} at {winners[0]['bits']:.2f} "
                    "bits)" if winners else "")
            parts.append(f"{d}: {len(winners)} of {len(compared)}{best}")
        return "; ".join(parts)

    bar = PPL_MARGIN_PP / 100
    lines = [f"### {name} — the questions, answered", ""]
    int8 = {d: find(g, "int8") for d, g in groups.items()}
    if all(int8.values()):
        lossless = all(abs(r["delta_vs_fp32"]) < bar for r in int8.values())
        lines.append(f"- **Is int8 static state quantization lossless (|Δ perplexity| below {PPL_MARGIN_PP}%)?** "
                     f"{'Yes' if lossless else 'No'}: " + "; ".join(
                         f"{d} {_pct(r['delta_vs_fp32'], r.get('delta_stderr'))}{fidelity(r)}{lambada(r, groups[d])}"
                         for d, r in int8.items()) + ".")
    if judged:
        noise = (f"{PPL_SE:g} paired standard errors" if all(map(has_paired_stderr, groups.values()))
                 else f"{PPL_MARGIN_PP} pp")
        text = ("- **Do gate, entropy and budget policies (and the composed formats) beat uniform quantization at "
                f"equal average bits?** In Δ perplexity, configs below the interpolated uniform curve by more than "
                f"{noise} — {counts(judged, lambda x: f'{100 * x:.2f} pp')}.")
        if judged_kl:
            text += (f" In KL vs fp32, configs below the uniform curve (interpolated in log KL) by more than "
                     f"{KL_SE:g} standard errors — {counts(judged_kl, lambda x: f'a factor {math.exp(x):.2f}')}. "
                     "Where the two disagree, trust the KL: Δ perplexity also counts noise in the state that "
                     "happens to lower the perplexity of a model that is weak on the text, KL only the distance "
                     "from fp32's predictions.")
        lines.append(text + " Each dataset's verdicts above list the configs; a win that appears on one dataset "
                     "only, or only between two distant uniform points, is weak evidence.")
    gate = {d: (find(g, SEED_CONFIGS["gsq-gate"]), int8[d]) for d, g in groups.items()}
    if all(a and b for a, b in gate.values()):
        holds = all(abs(r["delta_vs_fp32"]) < bar for r, _ in gate.values())
        lines.append(
            f"- **The GSQ seed: gate-closed states go to int8 \"without losing information\".** `gsq-gate` "
            f"({SEED_CONFIGS['gsq-gate']}: closed → int8, open → fp16) — " + "; ".join(
                f"{d}: Δ {_pct(r['delta_vs_fp32'])} at {r['avg_state_bits']:.2f} bits vs uniform int8 "
                f"{_pct(i['delta_vs_fp32'])} at {i['avg_state_bits']:.2f} bits" for d, (r, i) in gate.items()) +
            f". The claim {'holds' if holds else 'does not hold'} at the {PPL_MARGIN_PP}% bar; what the open "
            "states' fp16 buys is the difference to uniform int8, which stores every state in int8.")
    entropy = {d: (find(g, SEED_CONFIGS["gsq-entropy"]), int8[d]) for d, g in groups.items()}
    if all(a and b for a, b in entropy.values()):
        lines.append(
            "- **The entropy seed: low-entropy tokens in 4-bit states save about "
            f"{100 * SEED_BANDWIDTH_CLAIM:.0f}% of state bandwidth.** `gsq-entropy` ({SEED_CONFIGS['gsq-entropy']}: "
            "int4 when the next-token distribution is confident, fp16 otherwise) — " + "; ".join(
                f"{d}: {r['avg_state_bits']:.2f} bits = {100 * (1 - r['avg_state_bits'] / 16):.0f}% less state "
                f"traffic than an fp16 state, Δ {_pct(r['delta_vs_fp32'])}; uniform int8 "
                f"{100 * (1 - i['avg_state_bits'] / 16):.0f}% less, Δ {_pct(i['delta_vs_fp32'])}"
                for d, (r, i) in entropy.items()) +
            " (bits include the scales; state bytes moved per step are proportional to them).")
    return lines + [""]


def recall_summary(name: str, records: list[dict[str, Any]], train_gap: int, gaps: list[int]) -> str:
    """fp32/int8/int4/int3 recall and the best dynamic config at ≤ 4 average bits, at the training gap and 4x."""
    parts = []
    for gap in (train_gap, 4 * train_gap):
        if gap not in gaps:
            parts.append(f"gap {gap}: not measured (use --recall-gaps)")
            continue
        seen = {r["config"]: {**r, **r["by_gap"][str(gap)]} for r in records}
        uniform = ", ".join(f"{c} {100 * seen[c]['recall']:.2f}%" for c in ("fp32", "int8", "int4", "int3")
                            if c in seen)
        dynamic = [r for r in seen.values() if r["policy"] != "static" and r["avg_state_bits"] <= 4.0]
        best = max(dynamic, key=lambda r: (r["recall"], -r["avg_state_bits"]), default=None)
        text = (f"best dynamic at ≤ 4 bits {best['config']} {100 * best['recall']:.2f}% "
                f"({best['avg_state_bits']:.2f} bits)" if best else "no dynamic config at ≤ 4 average bits")
        parts.append(f"gap {gap}{' (training gap)' if gap == train_gap else ' (4x)'}: {uniform}; {text}")
    return f"**{name} recall:** " + "; ".join(parts) + "."


# -- figures and sections -----------------------------------------------------------------------------
def pareto_figure(records: list[dict[str, Any]], title: str):
    """`gsq_hf.plot.pareto` for the uniform formats (its line), one dashed line per other family (the composed
    front, stochastic rounding, each dynamic family); beside it the same configs' KL vs fp32."""
    from matplotlib.figure import Figure

    ok = [r for r in records if not r.get("error") and math.isfinite(r.get("perplexity") or math.nan)]
    kl = [r for r in ok if has_kl(r) and r["kl_divergence"] > 0]
    fig = Figure(figsize=(15.0, 5.0) if kl else (8.0, 5.0), layout="constrained")
    ax, kl_ax = fig.subplots(1, 2) if kl else (fig.subplots(), None)
    plot.pareto([r for r in ok if r["family"] == UNIFORM], x="bits", y="delta", ax=ax, title=title)
    styles = itertools.cycle(plot._DYNAMIC_STYLES)
    for family in dict.fromkeys(r["family"] for r in ok if r["family"] != UNIFORM):
        points = sorted(((r["avg_state_bits"], 100 * r["delta_vs_fp32"], r["config"].split("@")[-1])
                         for r in ok if r["family"] == family), key=lambda p: p[0])
        marker, color = next(styles)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, linestyle="--", color=color,
                label=family, zorder=3)
        plot.label_points(ax, points, color)
    ax.set_ylabel("Δ perplexity vs fp32 (%)")
    ax.legend(fontsize="small", loc="best")
    if kl_ax is not None:
        plot.families(kl, y="kl_divergence", y_label="KL(fp32 ‖ config), nats per token", ax=kl_ax,
                      title="the same configs: KL vs fp32 (log; cannot come out better than fp32)")
        kl_ax.set_yscale("log")
    return fig


def long_stream_section(group: list[dict[str, Any]], name: str, sname: str, out: Path) -> list[str]:
    """The markdown of one model's long streams; writes its plots into ``out``."""
    buckets = next((r["position_buckets"] for r in group if not r.get("error")), None)
    labels = bucket_labels(buckets["starts"], buckets["ends"]) if buckets else []
    fp32 = group[0]
    streams, tokens = fp32["streams"], fp32["stream_tokens"]
    per_range = ("FAILED" if fp32.get("error") else ", ".join(
        f"{label}: {ppl:.3f}" for label, ppl in zip(labels, fp32["position_buckets"]["perplexity"], strict=True)))
    md = [f"### {name} — long streams of {sname}", "",
          f"{streams} streams of {tokens} consecutive tokens of {sname} (`--long-stream-streams`, "
          "`--long-stream-tokens`), run as one batch through one cache from an empty state, every state stored "
          "after every token (`evaluation` in results.json: chunked forwards or stepped): the state is carried "
          "over the whole stream. Each column is a range of positions within the streams; Δ is the relative "
          "perplexity change vs fp32 on the same tokens (all streams pooled) ± its standard error over the "
          f"streams. fp32 perplexity per range: {per_range}.", "",
          long_stream_table(group, labels), "", growth_sentence(group, labels), ""]
    title = f"{name} — {sname}, {streams} streams of {tokens} tokens"
    if not fp32.get("error"):
        plot.save(plot.by_position(group, title=f"{title}: Δ perplexity by position"),
                  out / f"long-stream-{slug(name)}.png")
        md += [f"![long streams](long-stream-{slug(name)}.png)", ""]
    if any(has_kl(r) for r in group):
        md += ["KL(fp32 ‖ config) per token (nats; `--kl-top-k`, see the tables above) by position range, ± its "
               "standard error over the streams: unlike Δ perplexity it cannot come out better than fp32, so "
               "it shows an error that accumulates even where the perplexity change is within noise.", "",
               long_stream_kl_table(group, labels), "", kl_growth_sentence(group, labels), ""]
        plot.save(plot.by_position(group, metric="kl", title=f"{title}: KL vs fp32 by position"),
                  out / f"long-stream-kl-{slug(name)}.png")
        md += [f"![long streams, KL](long-stream-kl-{slug(name)}.png)", ""]
    return md


def model_sections(payload: dict[str, Any], source: str, out: Path) -> list[str]:
    """One model's tables, verdicts, questions, trace and long streams."""
    name = Path(source).name if Path(source).exists() else source.rsplit("/", 1)[-1]
    md = [f"## {name}", ""]
    provenance = model_provenance(source)
    md += [provenance, ""] if provenance else []
    groups, judged, judged_kl = {}, {}, {}
    for reference in (r for r in payload["references"] if r["model"] == name):
        dname = reference["dataset"]
        group = [r for r in payload["records"] if r["model"] == name and r["dataset"] == dname]
        verdicts = [v for v in payload["verdicts"] if v.get("model") == name and v.get("dataset") == dname]
        lambada = any("lambada_accuracy" in r for r in group)
        sentences = dataset_verdict_sentences(f"{name} — {dname}", verdicts, has_paired_stderr(group))
        md += [f"### {name} — {dname}", "",
               f"{reference['windows']} windows x {reference['context']} tokens ({reference['tokens']} scored). "
               f"Unpatched full-sequence reference perplexity: {reference['perplexity']:.4f}.", "",
               markdown_table(group, lambada), "", *[x for s in sentences for x in (s, "")]]
        groups[dname] = group
        for v in verdicts:
            if v["front"] == UNIFORM:
                (judged if v["metric"] == "perplexity" else judged_kl)[dname] = v["verdicts"]
        plot.save(pareto_figure(group, f"{name} — {dname}: Δ perplexity vs stored state bits"),
                  out / f"pareto-{slug(name)}-{slug(dname)}.png")
        md += [f"![pareto](pareto-{slug(name)}-{slug(dname)}.png)", ""]
    md += questions_section(name, groups, judged, judged_kl)
    trace = next(t for t in payload["traces"] if t["model"] == name)
    high = torch.tensor(trace["high_fraction"], dtype=torch.float32)[:, :, None]
    fig = plot.precision_trace({**trace, "high_fraction": high}, row=0, tokens=trace["tokens"],
                               title=f"{name}: {trace['config']} precision per layer x token")
    plot.save(fig, out / f"trace-{slug(name)}.png")
    first = payload["references"][0]["dataset"]
    md += [f"Precision trace of `{trace['config']}` on the first {len(trace['tokens'])} tokens of {first}:", "",
           f"![trace](trace-{slug(name)}.png)", ""]
    streams = [r for r in payload["long_stream"] if r["model"] == name]
    if streams:
        md += long_stream_section(streams, name, streams[0]["dataset"], out)
    return md


def recall_section(payload: dict[str, Any], out: Path) -> list[str]:
    """One table, summary, verdicts and plot per recall model."""
    num = payload["options"]["recall_num"]
    md = ["## Associative recall (MQAR)", "",
          f"Decode-faithful multi-query associative recall (`gsq_hf.eval.recall.recall_sweep`): `--recall-num {num}` "
          "seeded sequences per gap (seed 0: the same pairs and queries at every gap), every state write through "
          "the config. recall: fraction of queries answered (argmax); Δ: recall minus fp32's, in points; avg bits: "
          "stored bits per SSM state element, weighted by state writes over all gaps.", ""]
    for entry in payload["recall"]:
        name, records, gaps, spec = entry["model"], entry["results"], entry["gaps"], entry["task"]
        for r in records:
            r["recall_loss_points"] = -100.0 * r["delta_vs_fp32"]
        fig = plot.families(records, y="recall_loss_points", y_label="recall loss vs fp32 (points)",
                            baseline="fp32", symlog=1.0, title=f"{name}: recall loss vs stored state bits "
                                                                f"(gaps {', '.join(map(str, gaps))}, {num} seqs each)")
        plot.save(fig, out / f"recall-pareto-{slug(name)}.png")
        sentences = [verdict_sentence(f"{name}, {label} (recall)", verdicts, lambda x: f"{100 * x:.2f} points",
                                      RECALL_NOISE)
                     for v in payload["verdicts"] if v["metric"] == "recall" and v["model"] == name
                     for label, verdicts in v["verdicts"].items()]
        md += [f"### {name} — recall", "",
               f"Task: {spec['pairs']} key–value pairs ({spec['keys']} keys, {spec['values']} values), "
               f"{spec['queries']} queries, {spec['filler']} filler ids; training gap {entry['training_gap']}; gaps "
               f"{', '.join(map(str, gaps))}; {records[0]['queries']} queries per config in all "
               f"({entry['seconds']:.0f} s).", "",
               recall_table_md(records, gaps), "", recall_summary(name, records, entry["training_gap"], gaps), "",
               *[x for s in sentences for x in (s, "")], f"![recall pareto](recall-pareto-{slug(name)}.png)", ""]
    return md


def report(payload: dict[str, Any], command: str, out: Path) -> str:
    """results.md of a sweep payload (writing the plots into ``out``)."""
    o = payload["options"]
    info = payload["versions"]
    md = ["# Results: decode-faithful perplexity and recall of every state config", "",
          "Generated by `scripts/results.py` over `gsq-hf sweep` (`gsq_hf.eval.sweep`); every number below is "
          "computed by it, none written by hand.", "",
          "Why the dynamic policies lose, and the improvements tried (stochastic rounding, finer groups, ...): "
          "[improvements.md](improvements.md), by `scripts/improvements.py`. The composed formats: "
          "[formats.md](formats.md).", "", "```", command, "```", "",
          "Versions: " + ", ".join(f"{k} {v}" for k, v in info.items()) +
          f"; device {o['device']}, weights {o['dtype']}, {payload.get('threads', 1)} thread(s).", "",
          f"Windows: `--context {o['context']}`, first `--max-tokens {o['max_tokens']}` tokens of each dataset, "
          f"`--batch-size {o['batch_size']}`; all configs scored on the same windows, every state stored after "
          "every token as generation stores it (chunked forwards where that is faithful, token by token for "
          "entropy policies: `evaluation` in results.json). Δ is the relative perplexity change vs fp32. avg "
          "state bits: stored bits per SSM state element (scales included); state B/seq: SSM + conv state bytes "
          "per sequence. Two static fronts: `uniform` (round-to-nearest fp32 … int2, the reference of every "
          "verdict) and `composed` (mid-rise codes, e4m3 or log8 scales, Hadamard rotation, the gsq-4bit/gsq-3bit "
          "presets as configs/ defines them). LAMBADA: last-word accuracy (greedy, every target token) and "
          f"perplexity exp(mean NLL per last word), on the first `--lambada-examples {o['lambada_examples']}` "
          "examples.", ""]
    if not o["recall_only"]:
        for source in o["models"]:
            md += model_sections(payload, source, out)
    if payload["recall"]:
        md += recall_section(payload, out)
    return "\n".join(md + [f"Total time: {payload['seconds']:.1f} s."]) + "\n"


PAYLOAD_LISTS = ("references", "records", "long_stream", "recall", "traces", "verdicts")


def merge_payloads(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """One payload from the parts of a run (same grid, other models or the recall part): their records side by
    side, every command, the longest part's time (the parts ran at once); the first part's options and versions,
    with the recall options of the part that ran recall."""
    if len(payloads) == 1:
        return payloads[0]
    merged = {**payloads[0], "command": "\n".join(p["command"] for p in payloads),
              "seconds": max(p.get("seconds", 0.0) for p in payloads)}
    for key in PAYLOAD_LISTS:
        merged[key] = [item for p in payloads for item in p.get(key, [])]
    model_parts = [p for p in payloads if not p["options"]["recall_only"]]
    options = {**(model_parts or payloads)[0]["options"], "recall_only": not model_parts,
               "models": [m for p in model_parts for m in p["options"]["models"]]}
    recall_part = next((p for p in payloads if p.get("recall")), None)
    if recall_part is not None:
        options |= {k: v for k, v in recall_part["options"].items() if k.startswith("recall") and k != "recall_only"}
    return merged | {"options": options}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep_arguments(parser)
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="report directory (default: docs/)")
    parser.add_argument("--from-json", type=Path, action="append", help="write the report of this results.json; "
                        "run nothing (repeatable: the parts of one run made by several processes, e.g. one per model "
                        "and one --recall-only, are reported together)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        payload = merge_payloads([json.loads(path.read_text()) for path in args.from_json])
        command = payload["command"]
        if len(args.from_json) > 1:  # the parts' commands, then the one that reported them together
            command = payload["command"] = f"{command}\npython scripts/results.py " + shlex.join(
                sys.argv[1:] if argv is None else argv)
            write_json(args.out / "results.json", payload)
    else:
        args.dataset = args.dataset or DEFAULT_DATASETS
        options = sweep_options(args)
        torch.set_num_threads(args.threads or 1)
        command = "python scripts/results.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        payload = {"command": command, "threads": torch.get_num_threads()}
        try:
            with tqdm(total=sweep_size(options), desc="results", unit="config", disable=args.no_progress) as bar:
                run_sweep(options, payload, started=bar.set_postfix_str, finished=lambda: bar.update(1))
        except (EvalInputError, GSQConfigError, UnsupportedModelError) as error:  # one line, as gsq-hf sweep
            raise SystemExit(f"results.py: error: {' '.join(str(error).split())}") from None
        write_json(args.out / "results.json", payload)
    (args.out / "results.md").write_text(report(payload, command, args.out))
    return payload


if __name__ == "__main__":
    run_script(main)
