"""The results table: every state config on reference models and datasets, decode-faithfully.

    python scripts/results.py                                   # built-in model; wikitext-2, PTB, LAMBADA tests
    python scripts/results.py --model state-spaces/mamba-130m-hf --dataset ../shared/data/ptb/ptb.test.txt \
        --max-tokens 16384 --context 1024 --batch-size 8 --lambada-examples 500 --out docs/
    python scripts/results.py --dataset builtin --max-tokens 4096 --out /tmp/results_check

For each ``--model`` x ``--dataset`` the text is cut into windows once (`make_windows`) and every config of
`CONFIGS` (uniform formats, then the dynamic grid) is scored on those same windows with
`decode_faithful_perplexity`. A LAMBADA JSONL (file name starting with ``lambada``) also gets last-word
accuracy and perplexity on its first ``--lambada-examples`` examples: context = all but the last word, the
last word's tokens scored decode-faithfully (every state write through the config), accuracy = every target
token is the greedy argmax, perplexity = exp(mean NLL per word) as lm-evaluation-harness reports it.

Long streams (does the error grow with sequence length?): ``--long-stream-streams`` streams of
``--long-stream-tokens`` consecutive tokens of ``--long-stream-dataset`` (concatenated text, default the first
non-LAMBADA ``--dataset``) run as one batch, each stepped token by token through one cache from an empty
state, so the state is carried over the whole stream. fp32, the uniform formats of `LONG_STREAM_UNIFORM` and
each dynamic family at its preset's setting (`LONG_STREAM_DYNAMIC`) are scored per position bucket
(``0, 256, 1024, 4096, ...``); ``--long-stream-tokens 0`` skips this part.

The grid: uniform round-to-nearest formats (fp32 ... int2: the curve every verdict compares against),
stochastic-rounding int4/int3 (``uniform-sr``, their own line), and dynamic families named with their formats
(``gate-closed int3/int8``...) across their knobs; ``--families`` runs a subset (fp32 always first).

Recall (issue 10): for each ``--recall-model`` (default: every ``gsq_hf/assets/recall-*``), `recall_sweep` over
the same configs, ``--recall-num`` MQAR sequences at each of ``--recall-gaps`` (default: the training gap and
4x it); ``--recall-num 0`` skips it, ``--recall-only`` runs only it:

    python scripts/results.py --recall-only --recall-num 256 --out /tmp/recall_results

Fidelity to fp32: the fp32 run keeps its top ``--kl-top-k`` next-token logits per token and every later config
is scored against them (`gsq_hf.eval.ReferenceTopK`): KL(fp32 ‖ config) per token (a lower bound of the full KL,
over fp32's top-k tokens and one bin for the rest) and top-1 agreement, overall and per long-stream position
bucket. Δ perplexity can come out below fp32 when the model is weak on the text; KL cannot.

Verdicts are computed, not written by hand: each dynamic config's perplexity Δ / KL / recall is compared with
the uniform curve interpolated in average bits between its two neighbouring uniform points (linearly; for KL,
linearly in log KL; no verdict outside their range); it "beats uniform" only by more than `PPL_MARGIN_PP`
(perplexity: no standard error), `KL_SE` standard errors of the difference over windows (KL) or `RECALL_SE`
binomial standard errors of the difference (recall).

Writes into ``--out``: ``results.md`` (one table per model and dataset; the command line and versions on
top), ``results.json`` (all records), ``pareto-<model>-<dataset>.png`` (Δ perplexity vs average stored bits:
uniform formats as `gsq_hf.plot.pareto`'s line, one line per dynamic policy family across its thresholds),
``trace-<model>.png`` (the gsq-gate preset's per layer x token precision on one passage) and
``long-stream-<model>.png`` / ``long-stream-kl-<model>.png`` (Δ perplexity / KL vs position bucket, one
line per config) and
``recall-pareto-<model>.png`` (recall loss vs fp32 in points vs average stored bits, one line per family).
results.json holds the records, ``"recall"`` (one entry per recall model) and ``"verdicts"``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import gsq_hf
from gsq_hf import plot
from gsq_hf.config import resolve_config
from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR
from gsq_hf.eval.data import EvalInputError, TokenWindows, load_model, load_text, load_tokenizer, make_windows
from gsq_hf.eval.perplexity import (
    NonFiniteLogitsError,
    bucket_labels,
    decode_faithful_perplexity,
    full_sequence_perplexity,
    log_position_buckets,
    reference_options,
)
from gsq_hf.eval.report import versions, write_json

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_DATASETS = [str(DATA / "wikitext-2-raw" / "wiki.test.raw"), str(DATA / "ptb" / "ptb.test.txt"),
                    str(DATA / "lambada" / "lambada_test.jsonl")]

# -- the grid: (family, config). fp32 first: every Δ is relative to it. -------------------------------
# A family name shows its formats (low/high) so plot legends say what each line stores.
UNIFORM = "uniform"  # round-to-nearest uniform formats: the curve every verdict compares against
UNIFORM_SR = "uniform-sr"  # stochastic rounding: a static policy, but its own line (not the verdict's curve)


def _dynamic(family: str, policy: str, low: str, high: str, knob: str, values, **extra) -> list[tuple[str, dict]]:
    """One family of dynamic configs: ``<family> <low>/<high>`` with one config per knob value."""
    label = f"{family} {low}/{high}"
    prefix = family if (low, high) in (("int8", "fp16"), ("int4", "fp16")) else f"{family}-{low}-{high}"
    return [(label, {"name": f"{prefix}@{v}", "policy": policy, "low_format": low, "high_format": high,
                     knob: v, **extra}) for v in values]


CONFIGS: list[tuple[str, str | dict]] = [
    (UNIFORM, "fp32"), (UNIFORM, "bf16"), (UNIFORM, "fp16"),
    (UNIFORM, {"name": "fp8", "policy": "static", "format": "fp8"}),
    (UNIFORM, "int8"),
    *[(UNIFORM, {"name": f, "policy": "static", "format": f}) for f in ("int7", "int6", "int5")],  # fill 8 → 4 bits
    (UNIFORM, "int4"), (UNIFORM, "int3"), (UNIFORM, "int2"),
    *[(UNIFORM_SR, {"name": f"{fmt}-sr", "policy": "static", "format": fmt, "rounding": "stochastic"})
      for fmt in ("int4", "int3")],
    *_dynamic("gate-open", "gate", "int8", "fp16", "threshold", (0.1, 0.3, 0.6), high_when="open"),
    *_dynamic("gate-closed", "gate", "int8", "fp16", "threshold", (0.1, 0.3, 0.6), high_when="closed"),
    *_dynamic("entropy", "entropy", "int4", "fp16", "threshold", (0.25, 0.5, 0.75)),
    *_dynamic("budget", "budget", "int4", "fp16", "budget_fraction", (0.1, 0.25, 0.5), high_when="open"),
    # the low-bit regime, where spending precision where it matters could beat uniform int3/int4
    *_dynamic("gate-open", "gate", "int3", "int8", "threshold", (0.02, 0.1, 0.3), high_when="open"),
    *_dynamic("gate-closed", "gate", "int3", "int8", "threshold", (0.02, 0.1, 0.3), high_when="closed"),
    *_dynamic("budget-closed", "budget", "int3", "int8", "budget_fraction", (0.1, 0.25), high_when="closed"),
    *_dynamic("entropy", "entropy", "int3", "int8", "threshold", (0.25, 0.5)),
]
FAMILIES = list(dict.fromkeys(family for family, _ in CONFIGS))


def select_configs(families: list[str] | None) -> list[tuple[str, str | dict]]:
    """The configs of ``families`` (None: all) in grid order; fp32 always first (every Δ is relative to it)."""
    if not families:
        return list(CONFIGS)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"--families: unknown {', '.join(map(repr, unknown))}; known: {', '.join(FAMILIES)}")
    return [CONFIGS[0]] + [(family, config) for family, config in CONFIGS[1:] if family in families]


TRACE_CONFIG = "gsq-gate"
# Long streams (16k+ steps per config, the costliest part): the uniform formats a user would store a state in
# (bf16, int8) and those the dynamic policies mix (int4, int3; int8), each dynamic family at its preset's setting
# (gsq-gate 0.3, gsq-entropy 0.5, gsq-budget 0.25).
LONG_STREAM_UNIFORM = ("fp32", "bf16", "fp16", "int8", "int4", "int3")
LONG_STREAM_DYNAMIC = ("gate-open@0.3", "gate-closed@0.3", "entropy@0.5", "budget@0.25")
# |Δ| rise from the first to the last bucket called growth: above the "lossless" bar (0.1 percentage
# point) and above twice its standard error over the streams.
GROWTH_PP = 0.1


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-") or "x"


def model_name(source: str) -> str:
    path = Path(source)
    return path.name if path.exists() else source.rsplit("/", 1)[-1]


# What a real checkpoint of the mamba-130m shape reaches (300B Pile tokens), for scale next to the models trained
# here: Gu & Dao 2023 (arXiv:2312.00752), Table 3. They report no WikiText-2 perplexity.
PUBLISHED_MAMBA_130M = "LAMBADA last-word accuracy 44.3%, perplexity 16.07; Pile validation perplexity 10.56"


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


def dataset_name(source: str) -> str:
    return "builtin" if source == "builtin" else (Path(source).stem if Path(source).exists() else source)


def is_lambada(source: str) -> bool:
    path = Path(source)
    return path.suffix == ".jsonl" and path.name.lower().startswith("lambada")


# -- LAMBADA ------------------------------------------------------------------------------------------
def lambada_examples(path: str | Path, limit: int | None) -> list[str]:
    texts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            texts.append(json.loads(line)["text"])
            if limit is not None and len(texts) >= limit:
                break
    return texts


def lambada_tokens(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """(context ids, last-word ids) per example; the target is the last whitespace-separated word with its
    leading space, tokenized on its own as lm-evaluation-harness does."""
    pairs = []
    for text in texts:
        context, word = text.rstrip().rsplit(" ", 1)
        ctx = tokenizer.encode(context, add_special_tokens=False)
        target = tokenizer.encode(" " + word, add_special_tokens=False)
        pairs.append((ctx, target))
    return pairs


@torch.inference_mode()
def lambada_score(model, pairs: list[tuple[list[int], list[int]]], config, batch_size: int = 8,
                  pad_id: int = 0) -> dict[str, Any]:
    """Last-word accuracy and perplexity, decode-faithfully: each batch of examples (left-aligned, padded on
    the right) is stepped one token at a time through a fresh `GSQCache`; every policy decides per row, so a
    row's scores do not depend on the others (padding only follows a row's last scored token)."""
    cfg = resolve_config(config)
    device = next(p.device for p in model.parameters())
    correct, nlls, target_tokens = 0, [], 0
    start = time.perf_counter()
    with gsq_hf.patched(model, cfg):
        for first in range(0, len(pairs), batch_size):
            batch = pairs[first:first + batch_size]
            rows = [ctx + tgt for ctx, tgt in batch]
            length = max(len(r) for r in rows)
            ids = torch.full((len(rows), length), pad_id, dtype=torch.int64)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(row)
            ids = ids.to(device)
            begin = torch.tensor([len(ctx) for ctx, _ in batch], device=device)   # first target position
            end = torch.tensor([len(r) for r in rows], device=device)
            nll = torch.zeros(len(rows), dtype=torch.float64, device=device)
            exact = torch.ones(len(rows), dtype=torch.bool, device=device)
            cache = gsq_hf.GSQCache(model.config, cfg)
            last_needed = int(end.max()) - 1
            for t in range(last_needed):
                logits = model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits[:, -1].float()
                scored = (begin <= t + 1) & (t + 1 < end)
                if bool(scored.any()):
                    target = ids[:, t + 1]
                    step = F.cross_entropy(logits, target, reduction="none").double()
                    nll += torch.where(scored, step, torch.zeros_like(step))
                    exact &= ~scored | (logits.argmax(dim=-1) == target)
            if not bool(torch.isfinite(nll).all()):
                raise NonFiniteLogitsError(f"{cfg.name}: NaN/Inf logits on LAMBADA examples {first}..")
            correct += int(exact.sum())
            nlls.extend(nll.tolist())
            target_tokens += sum(len(tgt) for _, tgt in batch)
    mean_nll = sum(nlls) / len(nlls)
    return {"lambada_accuracy": correct / len(pairs), "lambada_perplexity": math.exp(mean_nll),
            "lambada_token_perplexity": math.exp(sum(nlls) / target_tokens), "lambada_examples": len(pairs),
            "lambada_seconds": time.perf_counter() - start}


# -- trace --------------------------------------------------------------------------------------------
@torch.inference_mode()
def trace_passage(model, tokenizer, ids: torch.Tensor, config=TRACE_CONFIG):
    """Step one passage (1-D ids) through a traced cache; the trace dict and the token strings."""
    cfg = resolve_config(config)
    with gsq_hf.patched(model, cfg):
        cache = gsq_hf.GSQCache(model.config, cfg, trace=True)
        for t in range(ids.numel()):
            model(input_ids=ids[None, t:t + 1], cache=cache, use_cache=True)
    trace = cache.precision_trace()
    tokens = [tokenizer.decode([i]) for i in ids.tolist()]
    return trace, tokens


# -- long streams -------------------------------------------------------------------------------------
def long_stream_configs(configs: list[tuple[str, Any]] | None = None) -> list[tuple[str, Any]]:
    """fp32 (the baseline), the `LONG_STREAM_UNIFORM` formats and the `LONG_STREAM_DYNAMIC` representatives
    (of ``configs``, default all of `CONFIGS`)."""
    chosen = [(family, resolve_config(config)) for family, config in (CONFIGS if configs is None else configs)]
    return [(family, cfg) for family, cfg in chosen
            if cfg.name in (LONG_STREAM_UNIFORM if family == UNIFORM else LONG_STREAM_DYNAMIC)]


def long_stream_dataset(datasets: list[str]) -> str:
    """The first dataset of running text (a LAMBADA file is passages, but concatenated they still serve)."""
    return next((d for d in datasets if not is_lambada(d)), datasets[0])


def bucket_deltas(buckets: dict[str, Any], fp32: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Δ perplexity vs fp32 per bucket (all streams pooled) and its standard error over the streams (NaN with
    one stream), from per-stream ΣNLL: every stream has the same tokens in a bucket."""
    streams = len(buckets["window_nll_sum"])
    pooled = [p / q - 1.0 for p, q in zip(buckets["perplexity"], fp32["perplexity"], strict=True)]
    if streams < 2:
        return pooled, [math.nan] * len(pooled)
    extra_nll = (torch.tensor(buckets["window_nll_sum"], dtype=torch.float64)
                 - torch.tensor(fp32["window_nll_sum"], dtype=torch.float64))  # (streams, buckets)
    per_stream = torch.expm1(extra_nll / (torch.tensor(buckets["tokens"], dtype=torch.float64) / streams))
    return pooled, (per_stream.std(dim=0) / math.sqrt(streams)).tolist()


def bucket_kl_stderr(buckets: dict[str, Any]) -> list[float]:
    """Standard error of each bucket's mean KL over the streams (NaN with one stream): every stream has the
    same tokens in a bucket, so a stream's mean is its ΣKL over its share of the tokens."""
    per_stream = torch.tensor(buckets["window_kl_sum"], dtype=torch.float64)  # (streams, buckets)
    streams = per_stream.shape[0]
    if streams < 2:
        return [math.nan] * per_stream.shape[1]
    per_stream = per_stream / (torch.tensor(buckets["tokens"], dtype=torch.float64) / streams)
    return (per_stream.std(dim=0) / math.sqrt(streams)).tolist()


def long_stream_scores(model, streams: TokenWindows, labels: dict[str, Any], bar: tqdm,
                       configs: list[tuple[str, Any]] | None = None, kl_top_k: int = 0) -> list[dict[str, Any]]:
    """Per-position-bucket records of `long_stream_configs` on ``streams`` (one batch), with ``delta_vs_fp32``
    overall and per bucket (``position_buckets["delta_vs_fp32"]``, ``["delta_stderr"]``: `bucket_deltas`)
    against the first (fp32) record; with ``kl_top_k`` also KL vs fp32 per bucket (``["kl_divergence"]``,
    ``["kl_stderr"]``: `bucket_kl_stderr`)."""
    starts = log_position_buckets(streams.context)
    group, reference = [], None
    for family, cfg in long_stream_configs(configs):
        bar.set_postfix_str(f"{labels['model']} / long streams of {labels['dataset']} / {cfg.name}")
        base = {**labels, "family": family, "config": cfg.name, "gsq_config": cfg.to_dict(),
                "streams": streams.ids.shape[0], "stream_tokens": streams.context}
        try:
            result = decode_faithful_perplexity(model, streams, cfg, batch_size=streams.ids.shape[0],
                                                progress=False, position_buckets=starts,
                                                **reference_options(model, not group, reference, kl_top_k))
            reference = reference or result.reference
            group.append({**base, **result.to_dict(), "config": cfg.name})
        except NonFiniteLogitsError as error:
            group.append({**base, "perplexity": None, "error": str(error)})
        bar.update(1)
    fp32 = group[0]
    for r in group:
        ok = not r.get("error") and not fp32.get("error")
        r["delta_vs_fp32"] = r["perplexity"] / fp32["perplexity"] - 1.0 if ok else None
        if ok:
            buckets = r["position_buckets"]
            buckets["delta_vs_fp32"], buckets["delta_stderr"] = bucket_deltas(buckets, fp32["position_buckets"])
            if "window_kl_sum" in buckets:
                buckets["kl_stderr"] = bucket_kl_stderr(buckets)
    return group


def _pct(delta, stderr=math.nan) -> str:
    """``+1.234%``, or ``+1.234 ± 0.056%`` with a standard error."""
    if not (isinstance(delta, float) and math.isfinite(delta)):
        return "-"
    return f"{100 * delta:+.3f}" + (f" ± {100 * stderr:.3f}%" if math.isfinite(stderr) else "%")


def long_stream_table(group: list[dict[str, Any]], labels: list[str]) -> str:
    headers = ["config", "family", "avg state bits", "all positions", *labels]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(headers) - 2)) + "|"]
    for r in group:
        if r.get("error") or r.get("delta_vs_fp32") is None:
            cells = [r["config"], r["family"], "FAILED"] + ["-"] * (len(headers) - 3)
        else:
            buckets = r["position_buckets"]
            cells = [r["config"], r["family"], _f(r.get("avg_state_bits"), ".2f"), _pct(r["delta_vs_fp32"]),
                     *map(_pct, buckets["delta_vs_fp32"], buckets["delta_stderr"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def growth_sentence(group: list[dict[str, Any]], labels: list[str]) -> str:
    """The answer: which configs' |Δ| grows from the first position bucket to the last (`GROWTH_PP`), which
    still grow between the last two, and every config's Δ in the first and the last bucket."""
    question = "**Does the error grow with sequence length?** "
    scored = [r for r in group[1:] if r.get("delta_vs_fp32") is not None]
    if len(labels) < 2 or not scored:
        return question + ("Not measured: fewer than two position buckets (use a longer --long-stream-tokens)."
                           if scored else "Not measured: the fp32 baseline failed.")

    def rises(buckets: dict[str, Any], before: int, after: int) -> float:
        """How far |Δ| rises from bucket ``before`` to ``after`` beyond the larger of the two bars (< 0: not)."""
        delta, stderr = buckets["delta_vs_fp32"], buckets["delta_stderr"]
        noise = 2 * math.hypot(stderr[before], stderr[after])
        threshold = max(GROWTH_PP / 100, noise if math.isfinite(noise) else 0.0)
        return abs(delta[after]) - abs(delta[before]) - threshold

    grows = [r["config"] for r in scored if rises(r["position_buckets"], 0, -1) > 0]
    shrinks = [r["config"] for r in scored if rises(r["position_buckets"], -1, 0) > 0]
    still = [r["config"] for r in scored if r["config"] in grows and rises(r["position_buckets"], -2, -1) > 0]
    verdict = (f"Yes for {', '.join(grows)}" if grows else "No") + (
        f"; it shrinks for {', '.join(shrinks)}" if shrinks else "")
    if grows and len(labels) > 2:
        verdict += f"; still growing between the last two buckets: {', '.join(still) or 'none'}"

    def first_to_last(record: dict[str, Any]) -> str:
        delta, stderr = record["position_buckets"]["delta_vs_fp32"], record["position_buckets"]["delta_stderr"]
        return f"{record['config']} {_pct(delta[0], stderr[0])} → {_pct(delta[-1], stderr[-1])}"

    numbers = "; ".join(map(first_to_last, scored))
    return (question + f"{verdict}. Growth: |Δ| rises by more than {GROWTH_PP} percentage point and more than "
            f"twice its standard error over the {scored[0]['streams']} streams. Δ perplexity vs fp32 ± standard "
            f"error, positions {labels[0]} → {labels[-1]}: {numbers}.")


def _kl(value, stderr=math.nan) -> str:
    """``1.23e-04``, or ``1.23e-04 ± 5.6e-06`` with a standard error."""
    if not (isinstance(value, float) and math.isfinite(value)):
        return "-"
    return f"{value:.2e}" + (f" ± {stderr:.1e}" if isinstance(stderr, float) and math.isfinite(stderr) else "")


def has_kl(record: dict[str, Any]) -> bool:
    return not record.get("error") and isinstance(record.get("kl_divergence"), float)


def long_stream_kl_table(group: list[dict[str, Any]], labels: list[str]) -> str:
    headers = ["config", "family", "all positions", *labels]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(headers) - 2)) + "|"]
    for r in group[1:]:
        if not has_kl(r):
            cells = [r["config"], r["family"], "FAILED" if r.get("error") else "-"] + ["-"] * len(labels)
        else:
            buckets = r["position_buckets"]
            cells = [r["config"], r["family"], _kl(r["kl_divergence"], r.get("kl_stderr", math.nan)),
                     *map(_kl, buckets["kl_divergence"], buckets["kl_stderr"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kl_growth_sentence(group: list[dict[str, Any]], labels: list[str]) -> str:
    """Which configs' KL vs fp32 rises from the first position bucket to the last by more than twice the
    standard error of the difference (over the streams), with every config's first → last KL and ratio."""
    scored = [r for r in group[1:] if has_kl(r)]
    question = "**Does the divergence from fp32 grow with sequence length?** "
    if len(labels) < 2 or not scored:
        return question + "Not measured (fewer than two position buckets, or no KL: `--kl-top-k 0`)."

    def rises(buckets: dict[str, Any]) -> bool | None:
        kl, stderr = buckets["kl_divergence"], buckets["kl_stderr"]
        noise = 2 * math.hypot(stderr[0], stderr[-1])
        return kl[-1] - kl[0] > noise if math.isfinite(noise) else None

    grows = [r["config"] for r in scored if rises(r["position_buckets"])]
    numbers = "; ".join(f"{r['config']} {_kl(kl[0])} → {_kl(kl[-1])} (x{kl[-1] / kl[0]:.2f})"
                        for r in scored if (kl := r["position_buckets"]["kl_divergence"]) and kl[0] > 0)
    if any(rises(r["position_buckets"]) is None for r in scored):
        verdict = "Not judged (one stream: no standard error)"
    else:
        verdict = f"It grows for {', '.join(grows)}" if grows else "No config's KL grows"
    return (question + f"{verdict}: the last bucket's KL above the first's by more than twice the standard error "
            f"of the difference over the {scored[0]['streams']} streams. KL vs fp32 per token (nats), positions "
            f"{labels[0]} → {labels[-1]}: {numbers}.")


def long_stream_section(group: list[dict[str, Any]], streams: TokenWindows, name: str, sname: str,
                        out: Path) -> list[str]:
    """The markdown of one model's long streams; writes its plot into ``out``."""
    buckets = next((r["position_buckets"] for r in group if not r.get("error")), None)
    labels = bucket_labels(buckets["starts"], buckets["ends"]) if buckets else []
    fp32 = group[0]
    per_range = ("FAILED" if fp32.get("error") else ", ".join(
        f"{label}: {ppl:.3f}" for label, ppl in zip(labels, fp32["position_buckets"]["perplexity"], strict=True)))
    md = [f"### {name} — long streams of {sname}", "",
          f"{streams.ids.shape[0]} streams of {streams.context} consecutive tokens of {sname} "
          "(`--long-stream-streams`, `--long-stream-tokens`), run as one batch, each stepped token by token "
          "through one cache from an empty state: the state is carried over the whole stream. Each column is a "
          "range of positions within the streams; Δ is the relative perplexity change vs fp32 on the same "
          "tokens (all streams pooled) ± its standard error over the streams. fp32 perplexity per range: "
          f"{per_range}.", "",
          long_stream_table(group, labels), "", growth_sentence(group, labels), ""]
    if not fp32.get("error"):
        fig = plot.by_position(group, title=f"{name} — {sname}, {streams.ids.shape[0]} streams of "
                                            f"{streams.context} tokens: Δ perplexity by position")
        plot.save(fig, out / f"long-stream-{slug(name)}.png")
        md += [f"![long streams](long-stream-{slug(name)}.png)", ""]
    if any(has_kl(r) for r in group):
        md += ["KL(fp32 ‖ config) per token (nats; `--kl-top-k`, see the tables above) by position range, ± its "
               "standard error over the streams: unlike Δ perplexity it cannot come out better than fp32, so "
               "it shows an error that accumulates even where the perplexity change is within noise.", "",
               long_stream_kl_table(group, labels), "", kl_growth_sentence(group, labels), ""]
        fig = plot.by_position(group, metric="kl", title=f"{name} — {sname}, {streams.ids.shape[0]} streams of "
                                                         f"{streams.context} tokens: KL vs fp32 by position")
        plot.save(fig, out / f"long-stream-kl-{slug(name)}.png")
        md += [f"![long streams, KL](long-stream-kl-{slug(name)}.png)", ""]
    return md


# -- verdict: does a dynamic policy beat uniform at equal bits? ---------------------------------------
# Perplexity has no standard error here (one set of windows): a dynamic config beats uniform only if its Δ is
# lower than the interpolated uniform Δ by more than this margin (the "lossless" bar, in points).
PPL_MARGIN_PP = 0.1
# Recall: better than the interpolated uniform recall by more than this many binomial standard errors.
RECALL_SE = 2.0
# KL vs fp32: lower than the interpolated uniform KL by more than this many standard errors (over windows).
KL_SE = 2.0
# KL vs fp32 is taken over fp32's top-k tokens + one bin for the rest (`ReferenceTopK`: a lower bound of the full
# KL, tighter with a larger --kl-top-k; exact at the vocabulary size).
KL_TOP_K = 64


def interpolate_uniform(points: list[tuple[float, float, float]], bits: float) -> tuple[float, float] | None:
    """The uniform curve at ``bits``: ``(value, stderr)`` linearly interpolated between the two neighbouring
    uniform points ``(bits, value, stderr)``; None outside their range. Where several uniform formats store the
    same bits (bf16, fp16), the curve takes the first of them in ``points`` (callers put the best first)."""
    curve: list[tuple[float, float, float]] = []
    for point in sorted(points, key=lambda p: p[0]):  # stable: the first of equal bits wins
        if not (curve and math.isclose(curve[-1][0], point[0], rel_tol=1e-9)):
            curve.append(point)
    if not curve or not curve[0][0] - 1e-9 <= bits <= curve[-1][0] + 1e-9:
        return None
    for (x0, y0, e0), (x1, y1, e1) in itertools.pairwise(curve):
        if x0 - 1e-9 <= bits <= x1 + 1e-9:
            w = (bits - x0) / (x1 - x0)
            return y0 + w * (y1 - y0), math.hypot((1 - w) * e0, w * e1)
    return curve[0][1], curve[0][2]  # a single uniform point, at exactly its bits


def beats_uniform(records: list[dict[str, Any]], *, value: str, higher_is_better: bool,
                  stderr: str | None = None, margin: float = 0.0, n_se: float = RECALL_SE,
                  uniform_family: str = UNIFORM) -> list[dict[str, Any]]:
    """For each dynamic config (policy not static), its ``value`` against the uniform (round-to-nearest) curve
    interpolated at its average bits: ``{"config", "family", "bits", "value", "uniform", "gain", "noise",
    "beats"}`` with ``gain`` > 0 meaning better than uniform, ``noise`` = max(``margin``, ``n_se`` x the
    standard error of the difference) and ``beats`` = gain > noise; ``uniform`` is None (no verdict) outside
    the uniform formats' range of bits. ``stderr``: the key of each record's standard error (None: 0)."""
    def se(r):
        return float(r.get(stderr) or 0.0) if stderr else 0.0

    ok = [r for r in records if not r.get("error") and isinstance(r.get(value), (int, float))
          and math.isfinite(r[value]) and isinstance(r.get("avg_state_bits"), (int, float))]
    sign = 1.0 if higher_is_better else -1.0
    uniform = sorted(((r["avg_state_bits"], r[value], se(r)) for r in ok if r["family"] == uniform_family),
                     key=lambda p: (p[0], -sign * p[1]))  # at equal bits the best first
    verdicts = []
    for r in ok:
        if r.get("policy", r.get("gsq_config", {}).get("policy")) == "static":
            continue
        curve = interpolate_uniform(uniform, r["avg_state_bits"])
        entry = {"config": r["config"], "family": r["family"], "bits": r["avg_state_bits"], "value": r[value],
                 "uniform": None, "gain": None, "noise": None, "beats": None}
        if curve is not None:
            gain = sign * (r[value] - curve[0])
            noise = max(margin, n_se * math.hypot(se(r), curve[1]))
            entry.update(uniform=curve[0], gain=gain, noise=noise, beats=gain > noise)
        verdicts.append(entry)
    return verdicts


def verdict_sentence(where: str, verdicts: list[dict[str, Any]], amount: Callable[[float], str],
                     noise_text: str, curve: str = "linearly interpolated in average bits") -> str:
    """One sentence: which dynamic configs beat uniform at equal bits and by how much, or none. ``amount``
    writes a gain or a noise level (e.g. ``lambda x: f"{100 * x:.2f} pp"``)."""
    judged = [v for v in verdicts if v["uniform"] is not None]
    winners = sorted((v for v in judged if v["beats"]), key=lambda v: -v["gain"])
    outside = [v["config"] for v in verdicts if v["uniform"] is None]
    if winners:
        listed = "; ".join(f"{v['config']} ({v['bits']:.2f} bits: {amount(v['gain'])} better than the "
                           f"interpolated uniform, noise {amount(v['noise'])})" for v in winners)
    else:
        listed = "none"
    best = max(judged, key=lambda v: v["gain"] - v["noise"], default=None)
    closest = ("" if winners or best is None else
               f" (closest: {best['config']}, {best['bits']:.2f} bits, {amount(best['gain'])} better vs "
               f"noise {amount(best['noise'])})")
    tail = f" No verdict outside the uniform range of bits: {', '.join(outside)}." if outside else ""
    return (f"**Beats uniform at equal bits — {where}:** {listed}{closest}. {len(judged)} dynamic configs "
            f"compared with the round-to-nearest uniform curve {curve}; "
            f"{noise_text}.{tail}")


def perplexity_verdict(where: str, group: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    records = [{**r, "policy": r.get("gsq_config", {}).get("policy")} for r in group]
    verdicts = beats_uniform(records, value="delta_vs_fp32", higher_is_better=False, margin=PPL_MARGIN_PP / 100)
    return verdict_sentence(where + " (perplexity)", verdicts, lambda x: f"{100 * x:.2f} pp",
                            f"'beats' means a Δ perplexity lower by more than {PPL_MARGIN_PP} percentage point "
                            "(no standard error: one set of windows)"), verdicts


def kl_verdict(where: str, group: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Dynamic configs vs the uniform curve in KL vs fp32, interpolated in log KL (KL falls about
    geometrically with the bits: a straight chord in KL itself would favour anything between two formats)."""
    records = [{**r, "policy": r.get("gsq_config", {}).get("policy"), "log_kl": math.log(r["kl_divergence"]),
                "log_kl_stderr": r["kl_stderr"] / r["kl_divergence"] if math.isfinite(r["kl_stderr"]) else 0.0}
               for r in group if has_kl(r) and r["kl_divergence"] > 0]
    verdicts = beats_uniform(records, value="log_kl", higher_is_better=False, stderr="log_kl_stderr", n_se=KL_SE)
    return verdict_sentence(where + " (KL vs fp32)", verdicts, lambda x: f"a factor {math.exp(x):.2f} in KL",
                            f"'beats' means a KL lower by more than {KL_SE:g} standard errors of the difference "
                            "(each over the windows)", "interpolated in average bits linearly in log KL"), verdicts


# -- the questions, answered from one model's records ------------------------------------------
# The seeds' rules as the grid holds them (tests check they equal the presets): the GSQ note's "gate-closed
# states in int8, open ones in fp16" and the entropy note's "low-entropy tokens in 4-bit states".
SEED_CONFIGS = {"gsq-gate": "gate-open@0.3", "gsq-entropy": "entropy@0.5"}
SEED_BANDWIDTH_CLAIM = 0.25  # the entropy note: "reduce average memory bandwidth by 25%"


def questions_section(name: str, groups: dict[str, list[dict[str, Any]]],
                      judged: dict[str, list[dict[str, Any]]],
                      judged_kl: dict[str, list[dict[str, Any]]] | None = None) -> list[str]:
    """The questions of the results issue as sentences with this model's numbers, per dataset: is int8
    lossless, do dynamic policies beat uniform at equal bits (in Δ perplexity, and in KL vs fp32 where
    measured), and what of the two seeds' claims."""
    def find(group, config):
        return next((r for r in group if r["config"] == config and not r.get("error")), None)

    def delta(record):
        return f"{100 * record['delta_vs_fp32']:+.3f}%"

    def fidelity_text(record):
        if not has_kl(record):
            return ""
        return (f", KL {_kl(record['kl_divergence'])} nats/token, top-1 agreement "
                f"{100 * record['top1_agreement']:.2f}%")

    def lambada(record, group):
        fp32 = find(group, "fp32")
        if record.get("lambada_accuracy") is None or fp32 is None:
            return ""
        return f" (LAMBADA accuracy {100 * record['lambada_accuracy']:.1f}% vs {100 * fp32['lambada_accuracy']:.1f}%)"

    bar = PPL_MARGIN_PP / 100
    lines = [f"### {name} — the questions, answered", ""]
    int8 = {d: find(g, "int8") for d, g in groups.items()}
    if all(int8.values()):
        lossless = all(abs(r["delta_vs_fp32"]) < bar for r in int8.values())
        lines.append(f"- **Is int8 static state quantization lossless (|Δ perplexity| below {PPL_MARGIN_PP}%)?** "
                     f"{'Yes' if lossless else 'No'}: " + "; ".join(
                         f"{d} {delta(r)}{fidelity_text(r)}{lambada(r, groups[d])}" for d, r in int8.items()) + ".")

    def counts(verdicts_by_dataset, amount):
        parts = []
        for d, verdicts in verdicts_by_dataset.items():
            compared = [v for v in verdicts if v["uniform"] is not None]
            winners = sorted((v for v in compared if v["beats"]), key=lambda v: -v["gain"])
            best = (f" (largest: {winners[0]['config']}, {amount(winners[0]['gain'])} at "
                    f"{winners[0]['bits']:.2f} bits)" if winners else "")
            parts.append(f"{d}: {len(winners)} of {len(compared)}{best}")
        return "; ".join(parts)

    if judged:
        text = ("- **Do gate, entropy and budget policies beat uniform quantization at equal average bits?** "
                f"In Δ perplexity, dynamic configs below the interpolated uniform curve by more than {PPL_MARGIN_PP} "
                f"pp — {counts(judged, lambda x: f'{100 * x:.2f} pp')}.")
        if judged_kl:
            text += (f" In KL vs fp32, dynamic configs below the uniform curve (interpolated in log KL) by more than "
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
                f"{d}: Δ {delta(r)} at {r['avg_state_bits']:.2f} bits vs uniform int8 {delta(i)} at "
                f"{i['avg_state_bits']:.2f} bits" for d, (r, i) in gate.items()) +
            f". The claim {'holds' if holds else 'does not hold'} at the {PPL_MARGIN_PP}% bar; what the open "
            "states' fp16 buys is the difference to uniform int8, which stores every state in int8.")
    entropy = {d: (find(g, SEED_CONFIGS["gsq-entropy"]), int8[d]) for d, g in groups.items()}
    if all(a and b for a, b in entropy.values()):
        lines.append(
            "- **The entropy seed: low-entropy tokens in 4-bit states save about "
            f"{100 * SEED_BANDWIDTH_CLAIM:.0f}% of state bandwidth.** `gsq-entropy` ({SEED_CONFIGS['gsq-entropy']}: "
            "int4 when the next-token distribution is confident, fp16 otherwise) — " + "; ".join(
                f"{d}: {r['avg_state_bits']:.2f} bits = {100 * (1 - r['avg_state_bits'] / 16):.0f}% less state "
                f"traffic than an fp16 state, Δ {delta(r)}; uniform int8 {100 * (1 - i['avg_state_bits'] / 16):.0f}% "
                f"less, Δ {delta(i)}" for d, (r, i) in entropy.items()) +
            " (bits include the scales; state bytes moved per step are proportional to them).")
    return lines + [""]


# -- recall -------------------------------------------------------------------------------------------
def default_recall_models() -> list[str]:
    return [str(d) for d in sorted((ROOT / "gsq_hf" / "assets").glob("recall-*"))
            if (d / "recall_model.json").is_file()]


def binomial_stderr(correct: int, queries: int) -> float:
    """Standard error of a recall of ``correct``/``queries``, from the add-one estimate (correct + 1) /
    (queries + 2): never 0, so a config with no miss (or no hit) still carries the noise of its sample."""
    p = (correct + 1) / (queries + 2)
    return math.sqrt(p * (1 - p) / queries)


def recall_records(sweep: dict[str, Any], families: list[str], model: str) -> list[dict[str, Any]]:
    """`recall_sweep`'s records with family, model, the binomial standard error of each recall (overall and
    per gap, `binomial_stderr`) and Δ recall vs fp32 (the first config) in fractions."""
    records = []
    for family, record in zip(families, sweep["results"], strict=True):
        r = {"model": model, "family": family, **record, "delta_vs_fp32": record["delta_vs_first"]}
        r["recall_stderr"] = binomial_stderr(r["correct"], r["queries"])
        for g in r["by_gap"].values():
            g["recall_stderr"] = binomial_stderr(g["correct"], g["queries"])
        records.append(r)
    return records


def recall_table_md(records: list[dict[str, Any]], gaps: list[int]) -> str:
    headers = ["config", "family", "avg bits", "recall %", *(f"gap {g} %" for g in gaps), "Δ vs fp32 (points)",
               *(f"Δ gap {g}" for g in gaps)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(headers) - 2)) + "|"]
    for r in records:
        cells = [r["config"], r["family"], f"{r['avg_state_bits']:.2f}", f"{100 * r['recall']:.2f}",
                 *(f"{100 * r['recall_by_gap'][str(g)]:.2f}" for g in gaps), f"{100 * r['delta_vs_fp32']:+.2f}",
                 *(f"{100 * r['delta_by_gap'][str(g)]:+.2f}" for g in gaps)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def at_gap(records: list[dict[str, Any]], gap: int | None) -> list[dict[str, Any]]:
    """The records seen at one gap (None: all gaps pooled): recall, its stderr and the bits of that gap."""
    if gap is None:
        return records
    return [{**r, "recall": r["by_gap"][str(gap)]["recall"], "recall_stderr": r["by_gap"][str(gap)]["recall_stderr"],
             "avg_state_bits": r["by_gap"][str(gap)]["avg_state_bits"]} for r in records]


def recall_verdicts(name: str, records: list[dict[str, Any]], gaps: list[int]) -> tuple[list[str], dict]:
    noise = (f"'beats' means a recall higher by more than {RECALL_SE:g} binomial standard errors of the "
             "difference (each from the add-one estimate (correct + 1) / (queries + 2))")
    sentences, data = [], {}
    for gap in ([None] if len(gaps) > 1 else []) + list(gaps):
        label = "all gaps" if gap is None else f"gap {gap}"
        verdicts = beats_uniform(at_gap(records, gap), value="recall", higher_is_better=True,
                                 stderr="recall_stderr")
        data[label] = verdicts
        sentences.append(verdict_sentence(f"{name}, {label} (recall)", verdicts, lambda x: f"{100 * x:.2f} points",
                                          noise))
    return sentences, data


def recall_summary(name: str, records: list[dict[str, Any]], train_gap: int, gaps: list[int]) -> str:
    """fp32/int8/int4/int3 recall and the best dynamic config at ≤ 4 average bits, at the training gap and 4x."""
    parts = []
    for gap in (train_gap, 4 * train_gap):
        if gap not in gaps:
            parts.append(f"gap {gap}: not measured (use --recall-gaps)")
            continue
        seen = {r["config"]: r for r in at_gap(records, gap)}
        uniform = ", ".join(f"{c} {100 * seen[c]['recall']:.2f}%" for c in ("fp32", "int8", "int4", "int3")
                            if c in seen)
        dynamic = [r for r in seen.values() if r["policy"] != "static" and r["avg_state_bits"] <= 4.0]
        best = max(dynamic, key=lambda r: (r["recall"], -r["avg_state_bits"]), default=None)
        text = (f"best dynamic at ≤ 4 bits {best['config']} {100 * best['recall']:.2f}% "
                f"({best['avg_state_bits']:.2f} bits)" if best else "no dynamic config at ≤ 4 average bits")
        parts.append(f"gap {gap}{' (training gap)' if gap == train_gap else ' (4x)'}: {uniform}; {text}")
    return f"**{name} recall:** " + "; ".join(parts) + "."


# -- report -------------------------------------------------------------------------------------------
def _f(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def markdown_table(records: list[dict[str, Any]], lambada: bool) -> str:
    headers = ["config", "family", "perplexity", "word ppl", "Δ vs fp32", "KL vs fp32", "top-1 agree",
               "avg state bits", "state B/seq"]
    if lambada:
        headers[4:4] = ["LAMBADA acc", "LAMBADA ppl"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    for r in records:
        if r.get("error"):
            cells = [r["config"], r["family"], "FAILED"] + ["-"] * (len(headers) - 3)
        else:
            delta = r.get("delta_vs_fp32")
            top1 = r.get("top1_agreement")
            cells = [r["config"], r["family"], _f(r["perplexity"], ".4f"), _f(r["word_perplexity"], ".4f"),
                     f"{100 * delta:+.3f}%" if delta is not None and math.isfinite(delta) else "-",
                     _kl(r.get("kl_divergence"), r.get("kl_stderr", math.nan)),
                     f"{100 * top1:.2f}%" if isinstance(top1, float) else "-",
                     _f(r.get("avg_state_bits"), ".2f"), _f(r.get("state_bytes"), ",.0f")]
            if lambada:
                cells[4:4] = [_f(r.get("lambada_accuracy"), ".4f"), _f(r.get("lambada_perplexity"), ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_figure(records: list[dict[str, Any]], title: str):
    """`gsq_hf.plot.pareto` for the uniform formats (its line), plus one line per dynamic family (pareto
    itself draws each dynamic config as a separate point, not a family)."""
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
        for x, y, knob in points:
            ax.annotate(knob, (x, y), xytext=(5, 4), textcoords="offset points", fontsize="x-small", color=color)
    ax.set_ylabel("Δ perplexity vs fp32 (%)")
    ax.legend(fontsize="small", loc="best")
    if kl_ax is not None:
        plot.families(kl, y="kl_divergence", y_label="KL(fp32 ‖ config), nats per token", ax=kl_ax,
                      title="the same configs: KL vs fp32 (log; cannot come out better than fp32)")
        kl_ax.set_yscale("log")
    return fig


def recall_section(model_dirs: list[str], configs: list[tuple[str, Any]], args: argparse.Namespace,
                   payload: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> list[str]:
    """The markdown of the recall section (one table, plot and verdict per recall model); appends each
    model's sweep (records with family and standard errors) to ``payload`` and its verdicts to ``verdicts``."""
    from gsq_hf.eval.recall import load_recall_spec, read_recall_info, recall_sweep

    md = ["## Associative recall (MQAR)", "",
          f"Decode-faithful multi-query associative recall (`gsq_hf.eval.recall.recall_sweep`): "
          f"`--recall-num {args.recall_num}` seeded sequences per gap (seed 0: the same pairs and queries at every "
          "gap), each stepped token by token with every state write through the config. recall: fraction of "
          "queries answered (argmax); Δ: recall minus fp32's, in points; avg bits: stored bits per SSM state "
          "element, weighted by state writes over all gaps.", ""]
    for directory in model_dirs:
        name = model_name(directory)
        spec = load_recall_spec(directory)
        info = read_recall_info(directory)
        gaps = args.recall_gaps or [spec.gap, 4 * spec.gap]
        model = load_model(directory, args.dtype, args.device)
        started = time.perf_counter()
        sweep = recall_sweep(model, spec, [config for _, config in configs], gaps, args.recall_num,
                             batch_size=args.recall_batch_size, progress=not args.no_progress)
        records = recall_records(sweep, [family for family, _ in configs], name)
        sentences, judged = recall_verdicts(name, records, gaps)
        summary = recall_summary(name, records, spec.gap, gaps)
        seconds = time.perf_counter() - started
        payload.append({"model": name, "directory": str(directory), "task": sweep["task"], "gaps": gaps,
                        "num": args.recall_num, "seed": sweep["seed"], "training_gap": spec.gap,
                        "recall_fp32_trained": info.get("recall_fp32"), "seconds": seconds, "results": records})
        verdicts.append({"metric": "recall", "model": name, "verdicts": judged})
        for r in records:
            r["recall_loss_points"] = -100.0 * r["delta_vs_fp32"]
        fig = plot.families(records, y="recall_loss_points", y_label="recall loss vs fp32 (points)",
                            baseline="fp32", symlog=1.0, title=f"{name}: recall loss vs stored state bits "
                                                   f"(gaps {', '.join(map(str, gaps))}, {args.recall_num} seqs each)")
        plot.save(fig, args.out / f"recall-pareto-{slug(name)}.png")
        md += [f"### {name} — recall", "",
               f"Task: {spec.pairs} key–value pairs ({spec.keys} keys, {spec.values} values), {spec.queries} "
               f"queries, {spec.filler} filler ids; training gap {spec.gap}; gaps {', '.join(map(str, gaps))}; "
               f"{records[0]['queries']} queries per config in all ({seconds:.0f} s).", "",
               recall_table_md(records, gaps), "", summary, "", *[x for s in sentences for x in (s, "")],
               f"![recall pareto](recall-pareto-{slug(name)}.png)", ""]
    return md


# -- main ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="model dir or Hub id (repeatable; default: built-in)")
    parser.add_argument("--dataset", action="append",
                        help="'builtin', a text file, a JSONL... (repeatable; default: wikitext-2, PTB, LAMBADA tests)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="tokens per dataset (default 16384)")
    parser.add_argument("--context", type=int, default=512, help="window length (default 512)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--kl-top-k", type=int, default=KL_TOP_K,
                        help=f"fp32 logits kept per token for KL vs fp32 (default {KL_TOP_K}; 0: no KL)")
    parser.add_argument("--lambada-examples", type=int, default=500, help="LAMBADA examples scored (default 500)")
    parser.add_argument("--trace-tokens", type=int, default=64, help="tokens of the traced passage (default 64)")
    parser.add_argument("--long-stream-tokens", type=int, default=16384,
                        help="tokens per long stream, stepped with one cache (default 16384; 0 skips long streams)")
    parser.add_argument("--long-stream-streams", type=int, default=8,
                        help="long streams run as one batch (default 8; fewer if the text is shorter)")
    parser.add_argument("--long-stream-dataset",
                        help="text cut into long streams (default: the first non-LAMBADA --dataset)")
    parser.add_argument("--families", type=lambda text: [f.strip() for f in text.split(",") if f.strip()],
                        help="comma-separated families of CONFIGS to run (default: all; fp32 is always run "
                             "first), e.g. 'uniform,gate-closed int3/int8'")
    parser.add_argument("--recall-model", action="append",
                        help="recall model dir (repeatable; default: every gsq_hf/assets/recall-* dir)")
    parser.add_argument("--recall-num", type=int, default=256,
                        help="MQAR sequences per gap (default 256; 0 skips the recall section)")
    parser.add_argument("--recall-gaps", type=lambda text: [int(g) for g in text.split(",")],
                        help="comma-separated filler gaps (default: the model's training gap and 4x it)")
    parser.add_argument("--recall-batch-size", type=int, default=64, help="MQAR sequences run at once (default 64)")
    parser.add_argument("--recall-only", action="store_true",
                        help="only the recall section (no perplexity models, datasets, trace or long streams)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="model weights dtype")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.recall_only and args.recall_num <= 0:
        raise SystemExit("--recall-only with --recall-num 0 leaves nothing to run")
    configs = select_configs(args.families)
    models = [] if args.recall_only else (args.model or [str(BUILTIN_MODEL_DIR)])
    datasets = [] if args.recall_only else (args.dataset or DEFAULT_DATASETS)
    recall_models = (args.recall_model or default_recall_models()) if args.recall_num > 0 else []
    stream_source = args.long_stream_dataset or long_stream_dataset(datasets) if datasets else None
    stream_text = load_text(stream_source) if args.long_stream_tokens and stream_source else None
    command = "python scripts/results.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    info = versions()
    records: list[dict[str, Any]] = []
    references: list[dict[str, Any]] = []
    long_records: list[dict[str, Any]] = []
    recall_payload: list[dict[str, Any]] = []
    verdicts: list[dict[str, Any]] = []
    md = ["# Results: decode-faithful perplexity and recall of every state config", "",
          "Generated by `scripts/results.py`; every number below is computed by it, none written by hand.", "",
          "Why the dynamic policies lose, and the improvements tried (stochastic rounding, per-state-dim scales, "
          "finer groups, outlier units kept high): [improvements.md](improvements.md), by "
          "`scripts/improvements.py`.", "",
          "```", command, "```", "",
          "Versions: " + ", ".join(f"{k} {v}" for k, v in info.items()) +
          f"; device {args.device}, weights {args.dtype}.", "",
          f"Windows: `--context {args.context}`, first `--max-tokens {args.max_tokens}` tokens of each dataset, "
          f"`--batch-size {args.batch_size}`; all configs scored on the same windows. Δ is the relative perplexity "
          "change vs fp32. avg state bits: stored bits per SSM state element (scales included); state B/seq: "
          "SSM + conv state bytes per sequence. LAMBADA: last-word accuracy (greedy, every target token) and "
          "perplexity exp(mean NLL per last word), on the first "
          f"`--lambada-examples {args.lambada_examples}` examples.", ""]
    per_model = len(datasets) * len(configs) + (len(long_stream_configs(configs)) if stream_text is not None else 0)
    total = len(models) * per_model
    bar = tqdm(total=total, desc="results", unit="config", disable=args.no_progress)
    started = time.perf_counter()
    for source in models:
        name = model_name(source)
        model = load_model(source, args.dtype, args.device)
        tokenizer = load_tokenizer(source)
        streams = None
        if stream_text is not None:  # cut first: a text too short for one stream fails before the sweep
            try:
                streams = make_windows(tokenizer, stream_text, args.long_stream_tokens,
                                       args.long_stream_tokens * args.long_stream_streams)
            except EvalInputError as error:
                message = f"--long-stream-tokens {args.long_stream_tokens} on {stream_source}: {error}"
                raise SystemExit(message) from None
        md += [f"## {name}", ""]
        model_groups: dict[str, list[dict[str, Any]]] = {}
        model_judged: dict[str, list[dict[str, Any]]] = {}
        model_judged_kl: dict[str, list[dict[str, Any]]] = {}
        provenance = model_provenance(source)
        if provenance:
            md += [provenance, ""]
        trace_ids = None
        for dataset in datasets:
            dname = dataset_name(dataset)
            text = load_text(dataset)
            windows = make_windows(tokenizer, text, args.context, args.max_tokens)
            if trace_ids is None:
                trace_ids = windows.ids[0, :args.trace_tokens]
            lambada = is_lambada(dataset)
            pairs = lambada_tokens(tokenizer, lambada_examples(dataset, args.lambada_examples)) if lambada else None
            ref = full_sequence_perplexity(model, windows, batch_size=args.batch_size, progress=False)
            references.append({"model": name, "dataset": dname, **ref.to_dict()})
            group, reference = [], None
            for family, config in configs:
                cfg = resolve_config(config)
                bar.set_postfix_str(f"{name} / {dname} / {cfg.name}")
                base = {"model": name, "dataset": dname, "family": family, "config": cfg.name,
                        "gsq_config": cfg.to_dict(), "context": args.context, "windows": windows.ids.shape[0]}
                try:
                    result = decode_faithful_perplexity(model, windows, cfg, batch_size=args.batch_size,
                                                        progress=False,
                                                        **reference_options(model, not group, reference, args.kl_top_k))
                    reference = reference or result.reference
                    record = {**base, **result.to_dict(), "config": cfg.name}
                    if lambada:
                        record.update(lambada_score(model, pairs, cfg, args.batch_size,
                                                    tokenizer.pad_token_id or 0))
                except NonFiniteLogitsError as error:
                    record = {**base, "perplexity": None, "error": str(error)}
                group.append(record)
                bar.update(1)
            fp32 = next((r["perplexity"] for r in group if r["config"] == "fp32"), None)
            for r in group:
                ppl = r.get("perplexity")
                r["delta_vs_fp32"] = ppl / fp32 - 1.0 if ppl is not None and fp32 else None
            records += group
            md += [f"### {name} — {dname}", "",
                   f"{windows.ids.shape[0]} windows x {args.context} tokens ({windows.scored_tokens} scored). "
                   f"Unpatched full-sequence reference perplexity: {ref.perplexity:.4f}.", "",
                   markdown_table(group, lambada), ""]
            sentence, judged = perplexity_verdict(f"{name} — {dname}", group)
            verdicts.append({"metric": "perplexity", "model": name, "dataset": dname, "verdicts": judged})
            model_groups[dname], model_judged[dname] = group, judged
            md += [sentence, ""]
            if any(has_kl(r) for r in group):
                sentence, judged = kl_verdict(f"{name} — {dname}", group)
                verdicts.append({"metric": "kl", "model": name, "dataset": dname, "verdicts": judged})
                model_judged_kl[dname] = judged
                md += [sentence, ""]
            fig = pareto_figure(group, f"{name} — {dname}: Δ perplexity vs stored state bits")
            plot.save(fig, args.out / f"pareto-{slug(name)}-{slug(dname)}.png")
            md += [f"![pareto](pareto-{slug(name)}-{slug(dname)}.png)", ""]
        md += questions_section(name, model_groups, model_judged, model_judged_kl)
        trace, tokens = trace_passage(model, tokenizer, trace_ids)
        fig = plot.precision_trace(trace, row=0, tokens=tokens,
                                   title=f"{name}: {TRACE_CONFIG} precision per layer x token")
        plot.save(fig, args.out / f"trace-{slug(name)}.png")
        md += [f"Precision trace of `{TRACE_CONFIG}` on the first {trace_ids.numel()} tokens of "
               f"{dataset_name(datasets[0])}:", "", f"![trace](trace-{slug(name)}.png)", ""]
        if streams is not None:
            sname = dataset_name(stream_source)
            group = long_stream_scores(model, streams, {"model": name, "dataset": sname}, bar, configs,
                                       args.kl_top_k)
            long_records += group
            md += long_stream_section(group, streams, name, sname, args.out)
    bar.close()
    if recall_models:
        md += recall_section(recall_models, configs, args, recall_payload, verdicts)
    seconds = time.perf_counter() - started
    md += [f"Total time: {seconds:.1f} s."]
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    payload = {"command": command, "versions": info, "models": models, "datasets": datasets,
               "context": args.context, "max_tokens": args.max_tokens, "batch_size": args.batch_size,
               "kl_top_k": args.kl_top_k, "lambada_examples": args.lambada_examples, "device": args.device,
               "dtype": args.dtype,
               "long_stream_dataset": stream_source if stream_text is not None else None,
               "long_stream_tokens": args.long_stream_tokens, "long_stream_streams": args.long_stream_streams,
               "families": [f for f in FAMILIES if any(f == family for family, _ in configs)],
               "seconds": seconds, "references": references, "records": records, "long_stream": long_records,
               "recall": recall_payload, "verdicts": verdicts}
    write_json(args.out / "results.json", payload)
    return payload


if __name__ == "__main__":
    main()
