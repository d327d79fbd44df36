"""Which state formats move the Pareto front: stored bits vs fidelity to fp32, per model and dataset.

    python scripts/format_front.py --model /work/runs/ref-mamba-cpu-bpe --dataset wiki.valid --out results/front
    python scripts/format_front.py --recall gsq_hf/assets/recall-mamba --out results/front

For a language model, every candidate format runs decode-faithfully (`decode_faithful_perplexity`: the state
stored after every token) on the same windows as fp32, which keeps its top ``--kl-top-k`` logits per token:
KL(fp32 ‖ config) per token (a lower bound of the full KL, ± its standard error over windows), top-1
agreement and Δ perplexity (± its standard error paired over the windows, `gsq_hf.eval.paired`). For a recall
model (``--recall``, a directory from scripts/train_recall.py), decode-faithful recall at the training gap and 4x
it, Δ vs fp32 ± its standard error paired over the sequences. ``--max-tokens`` beyond a text's length scores
all of it. Stored bits are the memory report's average bits per
state element, every stored bit counted (payload, scales, second-level scales).

Candidates: the uniform baselines (int8 … int3 with fp32 scales: today's front), then the composed formats at
≤ 4.5 and ≤ 3.5 stored bits per element at d_state 16 (an e4m3/e8m0 scale costs 8 bits per group instead of
32), with and without the Hadamard rotation, mid-rise codes, the packed level grids (levels11: 4.0 bits with an
8-bit scale, levels5: 3.0), stochastic rounding. `--only` picks some; `--format` adds any other format by name.

Datasets: ``wiki.valid``, ``wiki.test``, ``ptb.test`` (../shared/data), ``builtin`` (the package's text), or
a path. Presets are chosen on one split and checked on the others (say which chose them): a number counts
when it comes from a model or split the choice did not see.

Writes ``front.json`` (every record), ``front.md`` (one table per model × dataset, sorted by bits) and one
``front-<model>-<dataset>.png`` (bits vs KL, log scale) per model × dataset into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

from gsq_hf.config import GSQConfig
from gsq_hf.errors import GSQConfigError
from gsq_hf.eval import decode_faithful_perplexity, make_windows
from gsq_hf.eval.data import load_model, load_text, load_tokenizer
from gsq_hf.eval.paired import nll_deltas
from gsq_hf.eval.recall import load_recall_spec, recall_sweep
from gsq_hf.eval.report import format_table, versions, write_json
from gsq_hf.formats import get_format

ROOT = Path(__file__).resolve().parents[1]
# the project's shared data: beside the checkout (/work/main, /work/shared), or further up from a worktree
SHARED = next((d / "shared" / "data" for d in ROOT.parents if (d / "shared" / "data").is_dir()),
              ROOT.parent / "shared" / "data")
DATASETS = {"wiki.valid": SHARED / "wikitext-2-raw" / "wiki.valid.raw",
            "wiki.test": SHARED / "wikitext-2-raw" / "wiki.test.raw",
            "ptb.test": SHARED / "ptb" / "ptb.test.txt"}
SR = {"rounding": "stochastic"}
BASELINES = ["int8", "int6", "int5", "int4", "int3"]
PRESETS = ["gsq-4bit", "gsq-3bit"]
CANDIDATES = {  # label -> config (a format or preset name is a config)
    **{name: name for name in BASELINES + PRESETS},
    "int4-sr": {"name": "int4-sr", "policy": "static", "format": "int4", **SR},
    **{f"{codes}-{scale}{rot}{sr_label}": {"name": f"{codes}-{scale}{rot}{sr_label}", "policy": "static",
                                           "format": f"{codes}-{scale}{rot}", **sr}
       for codes in ("int4", "midrise4", "levels11", "int3", "midrise3", "levels5", "midrise2")
       for scale in ("e4m3", "e8m0")
       for rot in ("", "-hadamard")
       for sr_label, sr in (("", {}), ("+sr", SR))},
}


def _add_format(label: str) -> str:
    """A `--format` argument as a candidate: a format's config (or a preset's), stochastic with ``+sr``, its
    scales held (`GSQConfig.scale_hold`) with ``+holdH``, groups of N values per scale (`GSQConfig.group_size`)
    with ``+gN``."""
    name, *suffixes = label.split("+")
    extra = {}
    for suffix in suffixes:
        hold = re.fullmatch(r"hold(0|0?\.\d+)", suffix)
        group = re.fullmatch(r"g([1-9]\d*)", suffix)
        if suffix == "sr":
            extra |= SR
        elif hold is not None:
            extra |= {"scale_hold": float(hold.group(1))}
        elif group is not None:
            extra |= {"group_size": int(group.group(1))}
        else:
            raise SystemExit(f"format_front.py: --format {label!r}: the suffixes accepted are '+sr', '+holdH' "
                             "with 0 <= H < 1 (e.g. +hold0.7; +hold0: fresh scales) and '+gN' (N values per scale, "
                             "e.g. +g16)")
    if name in PRESETS:  # the suffixes win over the preset's per-family fields too
        config = GSQConfig.from_preset(name).to_dict()
        config["family_overrides"] = {family: fields | extra
                                      for family, fields in (config["family_overrides"] or {}).items()} or None
    else:
        try:
            get_format(name)
        except GSQConfigError as error:
            raise SystemExit(f"format_front.py: --format {label!r}: {error}") from None
        config = {"policy": "static", "format": name}
    CANDIDATES[label] = {**config, "name": label.replace("+", "_"), **extra}
    return label


def _add_config(path: str) -> str:
    """A `--config` argument as a candidate: any GSQConfig file (YAML/JSON, policies included), labelled by
    its file name."""
    try:
        config = GSQConfig.from_file(path).to_dict()
    except (GSQConfigError, OSError) as error:
        raise SystemExit(f"format_front.py: --config {path!r}: {error}") from None
    label = Path(path).stem
    CANDIDATES[label] = {**config, "name": label}
    return label


def lm_front(model_dir: str, dataset: str, labels: list[str], args) -> list[dict]:
    """Records of every candidate on one model and dataset, scored against fp32 on the same windows."""
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    text = load_text(str(DATASETS.get(dataset, dataset)))
    windows = make_windows(tokenizer, text, args.context, args.max_tokens)
    fp32 = decode_faithful_perplexity(model, windows, "fp32", batch_size=args.batch_size, progress=False,
                                      keep_reference=min(args.kl_top_k, model.config.vocab_size))
    records = []
    for i, label in enumerate(labels, 1):
        result = decode_faithful_perplexity(model, windows, CANDIDATES[label], batch_size=args.batch_size,
                                            progress=False, reference=fp32.reference)
        delta_nll, nll_stderr, delta, stderr = map(float, nll_deltas(result.window_nll_sum, fp32.window_nll_sum,
                                                                     result.tokens))
        records.append({"model": Path(model_dir).name, "dataset": dataset, "config": label,
                        "bits": result.state["avg_state_bits"], "kl": result.kl_divergence,
                        "kl_stderr": result.kl_stderr, "top1": result.top1_agreement,
                        "perplexity": result.perplexity, "fp32_perplexity": fp32.perplexity,
                        "delta_ppl": delta, "delta_ppl_stderr": stderr, "delta_nll": delta_nll,
                        "delta_nll_stderr": nll_stderr, "tokens": result.tokens, "windows": windows.ids.shape[0],
                        "evaluation": result.state["evaluation"]})
        print(f"  [{i}/{len(labels)}] {label}: {records[-1]['bits']:.2f} bits, KL {result.kl_divergence:.3e}, "
              f"Δppl {100 * delta:+.3f} ± {100 * stderr:.3f}%", flush=True)
    return records


def recall_front(model_dir: str, labels: list[str], args) -> list[dict]:
    model, spec = load_model(model_dir), load_recall_spec(model_dir)
    gaps = [spec.gap, 4 * spec.gap]
    sweep = recall_sweep(model, spec, ["fp32", *(CANDIDATES[label] for label in labels)], gaps, args.recall_num,
                         batch_size=args.batch_size * 16)
    fp32, *rest = sweep["results"]
    return [{"model": Path(model_dir).name, "dataset": "recall", "config": label, "bits": r["avg_state_bits"],
             "recall": r["recall"], "recall_by_gap": r["recall_by_gap"], "fp32_recall_by_gap": fp32["recall_by_gap"],
             "delta_by_gap": r["delta_by_gap"], "delta_stderr_by_gap": r["delta_stderr_by_gap"],
             "queries": r["queries"], "sequences": args.recall_num} for label, r in zip(labels, rest, strict=True)]


def table(records: list[dict]) -> str:
    """One row per candidate, sorted by bits; differences from fp32 (scored on the same windows or sequences)
    ± their paired standard errors (`gsq_hf.eval.paired`)."""
    rows = sorted(records, key=lambda r: -r["bits"])
    if records[0]["dataset"] == "recall":
        gaps = list(records[0]["recall_by_gap"])
        fp32 = records[0]["fp32_recall_by_gap"]
        return format_table(["config", "bits", *[f"recall gap {g} % (fp32 {100 * fp32[g]:.2f})" for g in gaps],
                             *[f"Δ gap {g}, points ± SE" for g in gaps]],
                            [[r["config"], f"{r['bits']:.2f}", *[f"{100 * r['recall_by_gap'][g]:.2f}" for g in gaps],
                              *[f"{100 * r['delta_by_gap'][g]:+.2f} ± {100 * r['delta_stderr_by_gap'][g]:.2f}"
                                for g in gaps]] for r in rows])
    int4 = _int4_kl(records)
    return format_table(["config", "bits", "KL vs fp32", "± SE", "KL / int4's", "top-1", "Δ ppl ± SE"],
                        [[r["config"], f"{r['bits']:.2f}", f"{r['kl']:.3e}", f"{r['kl_stderr']:.1e}",
                          f"{r['kl'] / int4:.2f}" if int4 else "-", f"{100 * r['top1']:.2f}%",
                          f"{100 * r['delta_ppl']:+.3f} ± {100 * r['delta_ppl_stderr']:.3f}%"] for r in rows])


def _int4_kl(records: list[dict]) -> float | None:
    return next((r["kl"] for r in records if r["config"] == "int4"), None)


def plot(records: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    from gsq_hf import plot as gsq_plot

    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    base = sorted((r for r in records if r["config"] in BASELINES), key=lambda r: r["bits"])
    ax.plot([r["bits"] for r in base], [r["kl"] for r in base], "o-", color="gray", label="uniform (fp32 scales)")
    others = [r for r in records if r["config"] not in BASELINES]
    best = {}  # the lowest KL at each budget, and the presets, get a label; the rest are dots
    for r in others:
        key = round(r["bits"], 1)
        best[key] = min(best.get(key, r), r, key=lambda record: record["kl"])
    for r in others:
        preset = r["config"] in PRESETS
        ax.plot(r["bits"], r["kl"], "*" if preset else "o" if "hadamard" in r["config"] else "s", ms=9 if preset else 4,
                color="C3" if preset else "C0" if "e4m3" in r["config"] else "C1")
        if preset or r is best[round(r["bits"], 1)]:
            ax.annotate(r["config"], (r["bits"], r["kl"]), fontsize=7, xytext=(4, -9 if preset else 3),
                        textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("average stored bits per state element (scales included)")
    ax.set_ylabel("KL(fp32 ‖ config) per token, nats (top-k bound)")
    ax.set_title(f"{records[0]['model']} on {records[0]['dataset']}: circles rotated, blue e4m3, orange e8m0, "
                 "stars presets; labelled: the lowest KL at its bits", fontsize=9)
    ax.legend(loc="upper right")
    gsq_plot.save(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help="a language model directory (repeatable)")
    parser.add_argument("--recall", action="append", default=[], help="a recall model directory (repeatable)")
    parser.add_argument("--dataset", action="append", help="wiki.valid, wiki.test, ptb.test, builtin or a path "
                                                           "(repeatable; default: wiki.valid)")
    parser.add_argument("--only", nargs="+", choices=list(CANDIDATES), help="these candidates only")
    parser.add_argument("--format", action="append", default=[], metavar="NAME[+sr][+holdH][+gN]",
                        help="also score this format (any name gsq_hf.get_format accepts, or a gsq-4bit/gsq-3bit "
                             "preset; '+sr': stochastic rounding; '+holdH': scale_hold H; '+gN': group_size N), e.g. "
                             "midrise3-fp16-hadamard+sr, gsq-4bit+hold0.7, gsq-4bit+g16 (repeatable)")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="also score the GSQConfig in this YAML/JSON file, e.g. a precision policy over composed "
                             "formats; labelled by the file name (repeatable)")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--kl-top-k", type=int, default=1024)
    parser.add_argument("--recall-num", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    added = [_add_format(f) for f in args.format] + [_add_config(f) for f in args.config]
    labels = (args.only or ([] if added else list(CANDIDATES))) + added
    groups = [lm_front(m, d, labels, args) for m in args.model for d in (args.dataset or ["wiki.valid"])]
    groups += [recall_front(m, labels, args) for m in args.recall]
    args.out.mkdir(parents=True, exist_ok=True)
    md = ["# Format front", "", f"Command: `python scripts/format_front.py {' '.join(argv)}`", ""]
    for records in groups:
        md += [f"## {records[0]['model']} — {records[0]['dataset']}", "", "```", table(records), "```", ""]
        if records[0]["dataset"] != "recall" and any(math.isfinite(r["kl"]) and r["kl"] > 0 for r in records):
            dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(records[0]["dataset"]).name)
            plot(records, args.out / f"front-{records[0]['model']}-{dataset}.png")
    (args.out / "front.md").write_text("\n".join(md))
    write_json(args.out / "front.json", {"versions": versions(), "context": args.context,
                                         "max_tokens": args.max_tokens, "kl_top_k": args.kl_top_k,
                                         "records": [r for records in groups for r in records]})
    print("\n".join(md))
    print(json.dumps({"wrote": str(args.out)}))


if __name__ == "__main__":
    main()
