"""Which state formats move the Pareto front: stored bits vs fidelity to fp32, per model and dataset.

    python scripts/format_front.py --model /work/runs/ref-mamba-cpu-bpe --dataset wiki.valid --out results/front
    python scripts/format_front.py --recall gsq_hf/assets/recall-mamba --out results/front

For a language model, every candidate format runs decode-faithfully (`decode_faithful_perplexity`: the state
stored after every token) on the same windows as fp32, which keeps its top ``--kl-top-k`` logits per token:
KL(fp32 ‖ config) per token (a lower bound of the full KL, ± its standard error over windows), top-1
agreement and Δ perplexity (± its standard error paired over the windows, `gsq_hf.eval.paired`). For a recall
model (``--recall``, a directory from scripts/train_recall.py), decode-faithful recall at the training gap and 4x
it (or ``--recall-gaps``; ``--recall-pairs`` asks more pairs than trained, nearer the model's capacity), Δ vs
fp32 ± its standard error paired over the sequences. ``--max-tokens`` beyond a text's length scores all of it.
Stored bits are the memory report's average bits per state element, every stored bit counted (payload, scales,
second-level scales).

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
import itertools
import json
import math
import re
import sys
from pathlib import Path

import torch

import gsq_hf
from gsq_hf import GSQCache
from gsq_hf.cli.common import positive, run_script
from gsq_hf.config import GSQConfig
from gsq_hf.errors import GSQConfigError
from gsq_hf.eval import decode_faithful_perplexity, make_windows
from gsq_hf.eval.data import load_model, load_text, load_tokenizer
from gsq_hf.eval.paired import nll_deltas
from gsq_hf.eval.recall import RecallInputError, load_recall_spec, recall_sweep
from gsq_hf.eval.report import format_table, versions, write_json
from gsq_hf.formats import get_format
from gsq_hf.patch import patchable_mixers

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


def _suffixed(label: str, option: str) -> tuple[str, dict]:
    """``NAME[+sr|+qr][+holdH][+gN]`` as the name and the GSQConfig fields its suffixes set."""
    name, *suffixes = label.split("+")
    extra = {}
    for suffix in suffixes:
        hold = re.fullmatch(r"hold(0|0?\.\d+)", suffix)
        group = re.fullmatch(r"g([1-9]\d*)", suffix)
        if suffix == "sr":
            extra |= SR
        elif suffix == "qr":
            extra |= {"rounding": "quasirandom"}
        elif hold is not None:
            extra |= {"scale_hold": float(hold.group(1))}
        elif group is not None:
            extra |= {"group_size": int(group.group(1))}
        else:
            raise SystemExit(f"format_front.py: {option} {label!r}: the suffixes accepted are '+sr', '+qr', '+holdH' "
                             "with 0 <= H < 1 (e.g. +hold0.7; +hold0: fresh scales) and '+gN' (N values per scale, "
                             "e.g. +g16)")
    return name, extra


def _add_format(label: str) -> str:
    """A `--format` argument as a candidate: a format's config (or a preset's), stochastic with ``+sr``
    (quasi-random with ``+qr``), its scales held (`GSQConfig.scale_hold`) with ``+holdH``, groups of N values
    per scale (`GSQConfig.group_size`) with ``+gN``."""
    name, extra = _suffixed(label, "--format")
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
    """Records of every candidate on one model and dataset, scored against fp32 on the same windows; then, with
    ``--per-layer``, each of those formats on one state layer at a time, and with ``--allocate`` the formats per
    layer that those records say fit each budget best (`allocate`), scored too."""
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    text = load_text(str(DATASETS.get(dataset, dataset)))
    windows = make_windows(tokenizer, text, args.context, args.max_tokens)
    fp32 = decode_faithful_perplexity(model, windows, "fp32", batch_size=args.batch_size, progress=False,
                                      keep_reference=min(args.kl_top_k, model.config.vocab_size))

    def score(label: str, config: dict, **extra) -> dict:
        result = decode_faithful_perplexity(model, windows, config, batch_size=args.batch_size, progress=False,
                                            reference=fp32.reference)
        delta_nll, nll_stderr, delta, stderr = map(float, nll_deltas(result.window_nll_sum, fp32.window_nll_sum,
                                                                     result.tokens))
        record = {"model": Path(model_dir).name, "dataset": dataset, "config": label,
                  "bits": result.state["avg_state_bits"], "kl": result.kl_divergence,
                  "kl_stderr": result.kl_stderr, "top1": result.top1_agreement,
                  "perplexity": result.perplexity, "fp32_perplexity": fp32.perplexity,
                  "delta_ppl": delta, "delta_ppl_stderr": stderr, "delta_nll": delta_nll,
                  "delta_nll_stderr": nll_stderr, "tokens": result.tokens, "windows": windows.ids.shape[0],
                  "evaluation": result.state["evaluation"], **extra}
        print(f"  {label}: {record['bits']:.2f} bits, KL {result.kl_divergence:.3e}, "
              f"Δppl {100 * delta:+.3f} ± {100 * stderr:.3f}%", flush=True)
        return record

    records = [score(label, CANDIDATES[label]) for label in labels]
    layers = {mixer.layer_idx: adapter.d_state(mixer) for mixer, adapter in patchable_mixers(model)}
    elements = _state_elements(model) if args.allocate else {}
    per_layer = [score(f"{fmt}@layer{index}", {"policy": "static", "format": "fp32",
                                               "layer_overrides": {index: _layer_fields(fmt)}},
                       layer=index, layer_format=fmt)
                 for fmt in args.per_layer for index in sorted(layers)]
    for budget in args.allocate:
        formats = allocate(per_layer, layers, elements, budget)
        label = f"alloc{budget:g}"
        config = {"name": label, "policy": "static", "format": "fp32",
                  "layer_overrides": {i: _layer_fields(f) for i, f in formats.items()}}
        path = args.out / f"{label}-{Path(model_dir).name}-{Path(dataset).name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(GSQConfig.from_dict(config).to_yaml())
        records.append(score(label, config, allocation=formats, allocation_file=path.name))
    return records + per_layer


def _layer_fields(label: str) -> dict:
    """A `--per-layer` entry (``FORMAT[+sr|+qr][+holdH][+gN]``) as a layer's `GSQConfig.layer_overrides` fields."""
    name, extra = _suffixed(label, "--per-layer")
    return {"format": name, **extra}


@torch.no_grad()
def _state_elements(model) -> dict[int, int]:
    """SSM state elements per sequence of each state layer (the weights of `allocate`'s average)."""
    cache = GSQCache(model, "fp32")
    with gsq_hf.patched(model, "fp32"):
        model(torch.zeros(1, 1, dtype=torch.long, device=model.device), cache=cache)
    return {index: math.prod(layer.ssm_shape[1:]) for index, layer in enumerate(cache.layers)
            if layer in cache.gsq_layers}


def allocate(per_layer: list[dict], layers: dict[int, int], elements: dict[int, int], budget: float) -> dict[int, str]:
    """One format per state layer (from `--per-layer` records: each format's KL with only that layer quantized)
    minimizing the summed KL at most ``budget`` stored bits per state element on average (each layer weighted
    by its state elements; bits as `StateFormat.bits_per_element` at the layer's d_state, one group per d_state).
    Summing the layers' KLs assumes their errors add; the allocation is then scored as a whole. Exact (every
    combination) up to 10^5 combinations, else by Lagrangian relaxation over a grid of prices (the allocations
    on the lower convex hull of bits vs summed KL)."""
    def bits(label: str, index: int) -> float:
        fields = _layer_fields(label)
        return get_format(fields["format"]).bits_per_element(fields.get("group_size") or layers[index])

    options = {index: [(r["kl"], bits(r["layer_format"], index), r["layer_format"])
                       for r in per_layer if r["layer"] == index] for index in layers}
    total = sum(elements.values())
    if math.prod(len(opts) for opts in options.values()) <= 10**5:
        choices = (dict(zip(options, combo, strict=True)) for combo in itertools.product(*options.values()))
    else:
        choices = ({i: min(opts, key=lambda o, i=i: o[0] + price * o[1] * elements[i] / total)
                    for i, opts in options.items()} for price in [0.0, *torch.logspace(-9, 1, 601).tolist()])
    best = None
    for choice in choices:
        bits = sum(choice[i][1] * elements[i] for i in choice) / total
        kl = sum(o[0] for o in choice.values())
        if bits <= budget + 1e-9 and (best is None or kl < best[0]):
            best = (kl, {i: o[2] for i, o in choice.items()})
    if best is None:
        raise SystemExit(f"format_front.py: --allocate {budget:g}: no allocation of the --per-layer formats fits "
                         f"{budget:g} bits per element; add a format of fewer bits")
    return best[1]


def recall_front(model_dir: str, labels: list[str], args) -> list[dict]:
    model = load_model(model_dir)
    try:
        spec = load_recall_spec(model_dir, pairs=args.recall_pairs)
        gaps = args.recall_gaps or [spec.gap, 4 * spec.gap]
        sweep = recall_sweep(model, spec, ["fp32", *(CANDIDATES[label] for label in labels)], gaps,
                             args.recall_num, batch_size=args.batch_size * 16)
    except RecallInputError as error:
        raise SystemExit(f"format_front.py: --recall {model_dir}: {error}") from None
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


def layer_table(per_layer: list[dict]) -> str:
    """The `--per-layer` records as a matrix: a row per format, a column per layer, KL vs fp32."""
    formats = list(dict.fromkeys(r["layer_format"] for r in per_layer))
    layers = sorted({r["layer"] for r in per_layer})
    kl = {(r["layer_format"], r["layer"]): r["kl"] for r in per_layer}
    return format_table(["format", *[f"layer {i}" for i in layers]],
                        [[fmt, *[f"{kl[fmt, i]:.2e}" for i in layers]] for fmt in formats])


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
    parser.add_argument("--format", action="append", default=[], metavar="NAME[+sr|+qr][+holdH][+gN]",
                        help="also score this format (any name gsq_hf.get_format accepts, or a gsq-4bit/gsq-3bit "
                             "preset; '+sr': stochastic rounding; '+qr': quasi-random rounding; '+holdH': "
                             "scale_hold H; '+gN': group_size N), e.g. midrise3-fp16-hadamard+sr, gsq-4bit+hold0.7, "
                             "gsq-4bit+g16 (repeatable)")
    parser.add_argument("--config", action="append", default=[], metavar="FILE",
                        help="also score the GSQConfig in this YAML/JSON file, e.g. a precision policy over composed "
                             "formats; labelled by the file name (repeatable)")
    parser.add_argument("--per-layer", nargs="+", default=[], metavar="FORMAT[+sr|+qr][+holdH][+gN]",
                        help="also score each FORMAT on one state layer at a time, the others fp32: the layers' "
                             "sensitivity (language models; suffixes as --format's)")
    parser.add_argument("--allocate", nargs="+", type=float, default=[], metavar="BITS",
                        help="with --per-layer: the one format per layer that fits BITS stored bits per element "
                             "at the least summed per-layer KL, scored, and written as a YAML config into --out")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--kl-top-k", type=int, default=1024)
    parser.add_argument("--recall-num", type=int, default=256)
    parser.add_argument("--recall-gaps", type=positive, nargs="+", metavar="GAP",
                        help="filler tokens between pairs and queries (default: the training gap and 4x it)")
    parser.add_argument("--recall-pairs", type=positive, metavar="N",
                        help="key-value pairs per sequence (default: the training task's; more nears the model's "
                             "capacity, where the state's precision shows)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.allocate and not args.per_layer:
        raise SystemExit("format_front.py: --allocate chooses among the --per-layer formats; give --per-layer too")
    for fmt in args.per_layer:
        try:
            get_format(_layer_fields(fmt)["format"])
        except GSQConfigError as error:
            raise SystemExit(f"format_front.py: --per-layer {fmt!r}: {error}") from None
    added = [_add_format(f) for f in args.format] + [_add_config(f) for f in args.config]
    if not args.model and not args.recall:
        parser.error("nothing to score: give a language model (--model) or a recall model (--recall)")
    labels = (args.only or ([] if added or args.per_layer else list(CANDIDATES))) + added
    groups = [lm_front(m, d, labels, args) for m in args.model for d in (args.dataset or ["wiki.valid"])]
    groups += [recall_front(m, labels, args) for m in args.recall]
    args.out.mkdir(parents=True, exist_ok=True)
    md = ["# Format front", "", f"Command: `python scripts/format_front.py {' '.join(argv)}`", ""]
    for group in groups:
        records = [r for r in group if "layer" not in r]
        md += [f"## {group[0]['model']} — {group[0]['dataset']}", ""]
        if records:
            md += ["```", table(records), "```", ""]
        if len(records) < len(group):
            md += ["KL vs fp32 with one state layer in the format, the others fp32:", "", "```",
                   layer_table([r for r in group if "layer" in r]), "```", ""]
        md += [f"`{r['allocation_file']}`: {r['allocation']}" for r in records if "allocation" in r] + [""]
        if records and records[0]["dataset"] != "recall" and any(math.isfinite(r["kl"]) and r["kl"] > 0
                                                                   for r in records):
            dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(records[0]["dataset"]).name)
            plot(records, args.out / f"front-{records[0]['model']}-{dataset}.png")
    (args.out / "front.md").write_text("\n".join(md))
    write_json(args.out / "front.json", {"versions": versions(), "context": args.context,
                                         "max_tokens": args.max_tokens, "kl_top_k": args.kl_top_k,
                                         "records": [r for records in groups for r in records]})
    print("\n".join(md))
    print(json.dumps({"wrote": str(args.out)}))


if __name__ == "__main__":
    run_script(main)
