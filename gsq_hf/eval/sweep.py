"""The config grid over models and datasets, LAMBADA, long streams and recall: what ``gsq-hf sweep`` runs.

For each model x dataset the text is cut into windows once and every config of the grid is scored on those
same windows (`decode_faithful_perplexity`, chunked or stepped as `gsq_hf.eval.stepping` chooses; records say
which in ``evaluation``), with KL vs fp32 over fp32's top-k logits. A LAMBADA JSONL also gets last-word
accuracy and perplexity (`gsq_hf.eval.lambada`). Long streams (``long_stream_tokens`` consecutive tokens per
stream, the state carried over the whole stream) score fp32 and a few representatives per position bucket. Each
recall model (``gsq_hf/assets/recall-*`` by default) runs the same configs through `recall_sweep`. The verdicts
(`gsq_hf.eval.verdict`) compare every dynamic and composed config with the uniform front, and every dynamic one
with the composed front. Everything lands in one JSON payload; ``scripts/results.py`` writes the report.

The grid's families: ``uniform`` (round-to-nearest fp32 … int2: the front every verdict compares against),
``uniform-sr`` (stochastic rounding), ``composed`` (the composed formats of `gsq_hf.formats` and the
gsq-4bit/gsq-3bit presets: the new front) and the dynamic families, named ``<policy> <low>/<high>``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import GSQConfig, resolve_config
from .data import (
    EvalInputError,
    TokenWindows,
    check_model_source,
    load_model,
    load_text,
    load_tokenizer,
    make_windows,
)
from .lambada import is_lambada, lambada_examples, lambada_score, lambada_tokens
from .perplexity import (
    NonFiniteLogitsError,
    decode_faithful_perplexity,
    full_sequence_perplexity,
    log_position_buckets,
    reference_options,
)
from .recall import add_recall_deltas, load_recall_spec, read_recall_info, recall_sweep
from .report import add_deltas, versions
from .stepping import needs_stepping, next_token_logits
from .verdict import (
    UNIFORM,
    binomial_stderr,
    bucket_deltas,
    bucket_kl_stderr,
    is_dynamic,
    kl_verdicts,
    perplexity_verdicts,
    recall_verdicts,
)

__all__ = ["COMPOSED", "CONFIGS", "FAMILIES", "LONG_STREAM", "SweepOptions", "UNIFORM", "UNIFORM_SR",
           "default_recall_models", "long_stream_configs", "recall_records", "run_sweep", "select_configs",
           "sweep_size"]

UNIFORM_SR = "uniform-sr"  # stochastic rounding: static, but its own line (not the verdicts' front)
COMPOSED = "composed"  # composed formats (codes, cheaper scales, rotation) and their presets: the new front
ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _dynamic(family: str, policy: str, low: str, high: str, knob: str, values, **extra) -> list[tuple[str, dict]]:
    """One family of dynamic configs, ``<family> <low>/<high>``, one config per knob value."""
    prefix = family if (low, high) in (("int8", "fp16"), ("int4", "fp16")) else f"{family}-{low}-{high}"
    return [(f"{family} {low}/{high}", {"name": f"{prefix}@{v}", "policy": policy, "low_format": low,
                                        "high_format": high, knob: v, **extra}) for v in values]


def _static(family: str, fmt: str, name: str | None = None, **extra) -> tuple[str, dict]:
    return family, {"name": name or fmt, "policy": "static", "format": fmt, **extra}


MIDRISE3 = "midrise3-e4m3-hadamard"  # the best 3-bit composed format (docs/formats.md): the dynamic mixes' low
CONFIGS: list[tuple[str, str | dict]] = [
    (UNIFORM, "fp32"), (UNIFORM, "bf16"), (UNIFORM, "fp16"), _static(UNIFORM, "fp8"), (UNIFORM, "int8"),
    *[_static(UNIFORM, f) for f in ("int7", "int6", "int5")],  # fill 8 → 4 bits
    (UNIFORM, "int4"), (UNIFORM, "int3"), (UNIFORM, "int2"),
    *[_static(UNIFORM_SR, f, f"{f}-sr", rounding="stochastic") for f in ("int4", "int3")],
    *[_static(COMPOSED, f) for f in ("int4-e4m3", "midrise4-e4m3", "int4-e4m3-hadamard", "midrise4-e4m3-hadamard",
                                     MIDRISE3)],
    _static(COMPOSED, MIDRISE3, f"{MIDRISE3}-sr", rounding="stochastic"),
    (COMPOSED, "gsq-4bit"), (COMPOSED, "gsq-3bit"),
    *_dynamic("gate-open", "gate", "int8", "fp16", "threshold", (0.1, 0.3, 0.6), high_when="open"),
    *_dynamic("gate-closed", "gate", "int8", "fp16", "threshold", (0.1, 0.3, 0.6), high_when="closed"),
    *_dynamic("entropy", "entropy", "int4", "fp16", "threshold", (0.25, 0.5, 0.75)),
    *_dynamic("budget", "budget", "int4", "fp16", "budget_fraction", (0.1, 0.25, 0.5), high_when="open"),
    # the low-bit regime, where spending precision where it matters could beat uniform int3/int4
    *_dynamic("gate-open", "gate", "int3", "int8", "threshold", (0.02, 0.1, 0.3), high_when="open"),
    *_dynamic("gate-closed", "gate", "int3", "int8", "threshold", (0.02, 0.1, 0.3), high_when="closed"),
    *_dynamic("budget-closed", "budget", "int3", "int8", "budget_fraction", (0.1, 0.25), high_when="closed"),
    *_dynamic("entropy", "entropy", "int3", "int8", "threshold", (0.25, 0.5)),
    # the same policies on top of the best low format
    *_dynamic("gate-closed", "gate", MIDRISE3, "int8", "threshold", (0.1, 0.3), high_when="closed"),
    *_dynamic("budget-closed", "budget", MIDRISE3, "int8", "budget_fraction", (0.1, 0.25), high_when="closed"),
]
FAMILIES = list(dict.fromkeys(family for family, _ in CONFIGS))
TRACE_CONFIG = "gsq-gate"
LONG_STREAM_TOKENS = 16384  # tokens per long stream unless set (and the text holds them)
# Long streams (the costliest part): fp32 (the baseline), the uniform formats a user would store a state in and
# those the dynamic policies mix, the composed presets, each seed dynamic family at its preset's setting.
LONG_STREAM = ("fp32", "bf16", "fp16", "int8", "int4", "int3", "gsq-4bit", "gsq-3bit",
               "gate-open@0.3", "gate-closed@0.3", "entropy@0.5", "budget@0.25")


class SweepInputError(EvalInputError):
    """A sweep option that cannot work (an unknown family, nothing to run)."""


def select_configs(families: list[str] | None = None) -> list[tuple[str, GSQConfig]]:
    """``(family, config)`` of ``families`` (None: all) in grid order; fp32 always first (every Δ is relative to
    it)."""
    unknown = [f for f in families or () if f not in FAMILIES]
    if unknown:
        raise SweepInputError(f"unknown families {', '.join(map(repr, unknown))}; known: {', '.join(FAMILIES)}")
    chosen = [(f, c) for i, (f, c) in enumerate(CONFIGS) if i == 0 or not families or f in families]
    return [(family, resolve_config(config)) for family, config in chosen]


def long_stream_configs(configs: list[tuple[str, GSQConfig]]) -> list[tuple[str, GSQConfig]]:
    """The `LONG_STREAM` configs among ``configs`` (fp32 first)."""
    return [(family, cfg) for family, cfg in configs if cfg.name in LONG_STREAM]


def default_recall_models() -> list[str]:
    """Every recall model shipped in ``gsq_hf/assets`` (a ``recall-*`` directory with a recall_model.json)."""
    return [str(d) for d in sorted(ASSETS.glob("recall-*")) if (d / "recall_model.json").is_file()]


def model_name(source: str) -> str:
    path = Path(source)
    return path.name if path.exists() else source.rsplit("/", 1)[-1]


def dataset_name(source: str) -> str:
    return "builtin" if source == "builtin" else (Path(source).stem if Path(source).exists() else source)


@dataclass
class SweepOptions:
    """What a sweep runs; the defaults are ``gsq-hf sweep``'s. ``recall_num`` 0 skips recall,
    ``long_stream_tokens`` 0 the long streams (None: `LONG_STREAM_TOKENS`, or as many as the text holds for
    ``long_stream_streams`` streams); empty ``models`` (with ``recall_only``) runs only recall."""

    models: list[str] = field(default_factory=lambda: [str(ASSETS / "tiny-mamba-pydoc")])
    datasets: list[str] = field(default_factory=lambda: ["builtin"])
    families: list[str] | None = None
    context: int = 512
    max_tokens: int = 16384
    batch_size: int = 8
    kl_top_k: int = 64
    lambada_examples: int = 500
    trace_tokens: int = 64
    long_stream_tokens: int | None = None
    long_stream_streams: int = 8
    long_stream_dataset: str | None = None  # default: the first non-LAMBADA dataset
    recall_models: list[str] | None = None  # default: `default_recall_models`
    recall_num: int = 256
    recall_gaps: list[int] | None = None  # default: each model's training gap and 4x it
    recall_batch_size: int = 64
    recall_only: bool = False
    stepped: bool | None = None  # None: chunked where faithful; True: every config token by token
    device: str = "cpu"
    dtype: str = "fp32"

    def stream_source(self) -> str | None:
        if self.recall_only or self.long_stream_tokens == 0 or not self.datasets:
            return None
        return self.long_stream_dataset or next((d for d in self.datasets if not is_lambada(d)), self.datasets[0])


def sweep_size(options: SweepOptions) -> int:
    """How many configs a sweep runs in all (over models, datasets, long streams and recall models)."""
    configs = select_configs(options.families)
    models = 0 if options.recall_only else len(options.models)
    per_model = len(options.datasets) * len(configs)
    per_model += len(long_stream_configs(configs)) if options.stream_source() else 0
    recall = len(options.recall_models or default_recall_models()) if options.recall_num > 0 else 0
    return models * per_model + recall * len(configs)


Started = Callable[[str], None]  # called with "model / dataset / config" as each config starts


def run_sweep(options: SweepOptions, payload: dict[str, Any] | None = None, *, started: Started | None = None,
              finished: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the sweep into ``payload`` (filled as configs finish, so Ctrl-C keeps them): ``records`` (one per
    model x dataset x config), ``references`` (unpatched full-sequence perplexity), ``long_stream``, ``recall``
    (one entry per recall model), ``traces`` (the `TRACE_CONFIG` precision per layer x token per model) and
    ``verdicts``. ``started(label)``/``finished()`` frame each config. Inputs are checked before any run."""
    payload = {} if payload is None else payload
    configs = select_configs(options.families)
    models = [] if options.recall_only else list(options.models)
    datasets = [] if options.recall_only else list(options.datasets)
    recall_models = (options.recall_models or default_recall_models()) if options.recall_num > 0 else []
    if not models and not recall_models:
        raise SweepInputError("nothing to run: no model (recall only) and no recall model (recall num 0)")
    for source in models:
        check_model_source(source)
    texts = {d: load_text(d) for d in datasets}
    stream_source = options.stream_source() if models else None
    stream_text = load_text(stream_source) if stream_source else None
    specs = {d: load_recall_spec(d) for d in recall_models}
    payload.update({"versions": versions(), "options": asdict(options),
                    "families": list(dict.fromkeys(f for f, _ in configs)), "configs": [c.name for _, c in configs],
                    "long_stream_dataset": stream_source, "records": [], "references": [], "long_stream": [],
                    "recall": [], "traces": [], "verdicts": []})
    start = time.perf_counter()

    def each(label: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if started:
            started(label)
        record = run()
        if finished:
            finished()
        return record

    for source in models:
        _model_part(source, options, configs, texts, stream_text, payload, each)
    for directory in recall_models:
        _recall_part(directory, specs[directory], options, configs, payload, each)
    payload["seconds"] = time.perf_counter() - start
    return payload


def _score(model, windows, family: str, cfg: GSQConfig, base: dict[str, Any], first: bool, kept: dict,
           options: SweepOptions, **extra) -> dict[str, Any]:
    """One config's decode-faithful record on ``windows`` (an error record if its logits went non-finite);
    the first config keeps its top-k logits in ``kept`` for the others' KL."""
    base = {**base, "family": family, "config": cfg.name, "gsq_config": cfg.to_dict()}
    try:
        result = decode_faithful_perplexity(model, windows, cfg, batch_size=extra.pop("batch_size", options.batch_size),
                                            progress=False, stepped=options.stepped,
                                            **reference_options(model, first, kept.get("reference"), options.kl_top_k),
                                            **extra)
    except NonFiniteLogitsError as error:
        return {**base, "perplexity": None, "error": str(error)}
    kept.setdefault("reference", result.reference)
    return {**base, **result.to_dict(), "config": cfg.name}


def _add_deltas(group: list[dict[str, Any]]) -> None:
    """Δ perplexity vs fp32 and, paired over the windows, its standard error and Δ mean NLL (`add_deltas`)."""
    fp32 = next((r for r in group if r["config"] == "fp32" and r.get("perplexity") is not None), {})
    add_deltas(group, base=fp32, key="delta_vs_fp32")


def _model_part(source, options, configs, texts, stream_text, payload, each) -> None:
    name = model_name(source)
    model = load_model(source, options.dtype, options.device)
    tokenizer = load_tokenizer(source)
    streams = None
    if stream_text is not None:  # cut first: a text too short for one stream fails before the sweep
        streams = _cut_streams(tokenizer, stream_text, options, payload["long_stream_dataset"])
    trace_ids = None
    for dataset, text in texts.items():
        windows = make_windows(tokenizer, text, options.context, options.max_tokens)
        trace_ids = windows.ids[0, :options.trace_tokens] if trace_ids is None else trace_ids
        _dataset_part(model, tokenizer, name, dataset, windows, options, configs, payload, each)
    payload["traces"].append({"model": name, **trace_passage(model, tokenizer, trace_ids)})
    if streams is not None:
        _long_streams(model, streams, name, options, configs, payload, each)


def _dynamic_or_composed(record: dict[str, Any]) -> bool:
    return is_dynamic(record) or record["family"] == COMPOSED


def _dataset_part(model, tokenizer, name, dataset, windows, options, configs, payload, each) -> None:
    """Every config on one dataset's windows (and its LAMBADA examples), its reference and its verdicts."""
    dname = dataset_name(dataset)
    pairs = (lambada_tokens(tokenizer, lambada_examples(dataset, options.lambada_examples))
             if is_lambada(dataset) else None)
    reference = full_sequence_perplexity(model, windows, batch_size=options.batch_size, progress=False)
    payload["references"].append({"model": name, "dataset": dname, "windows": windows.ids.shape[0],
                                  "context": windows.context, **reference.to_dict()})
    group: list[dict[str, Any]] = []
    kept: dict[str, Any] = {}
    base = {"model": name, "dataset": dname, "context": options.context, "windows": windows.ids.shape[0]}

    def run(family: str, cfg: GSQConfig, first: bool) -> dict[str, Any]:
        record = _score(model, windows, family, cfg, base, first, kept, options)
        if pairs is not None and not record.get("error"):
            try:
                record.update(lambada_score(model, pairs, cfg, options.batch_size, tokenizer.pad_token_id or 0,
                                            stepped=options.stepped))
            except NonFiniteLogitsError as error:
                record["error"] = str(error)
        return record

    for i, (family, cfg) in enumerate(configs):
        group.append(each(f"{name} / {dname} / {cfg.name}", lambda f=family, c=cfg, i=i: run(f, c, i == 0)))
        payload["records"].append(group[-1])
        _add_deltas(group)  # in place: the payload's records too
    _verdicts(payload, {"model": name, "dataset": dname}, group,
              (("perplexity", perplexity_verdicts), ("kl", kl_verdicts)))


def _verdicts(payload: dict[str, Any], where: dict[str, Any], group: list[dict[str, Any]], metrics) -> None:
    """Per metric: dynamic and composed configs vs the uniform front; dynamic ones vs the composed front."""
    for metric, judge in metrics:
        fronts = [(UNIFORM, _dynamic_or_composed)] + [(COMPOSED, is_dynamic)] * any(r["family"] == COMPOSED
                                                                                     for r in group)
        if metric == "kl" and not any("kl_divergence" in r for r in group):
            continue  # no KL measured (kl_top_k 0)
        for front, judged in fronts:
            payload["verdicts"].append({"metric": metric, **where, "front": front,
                                        "verdicts": judge(group, front=front, judged=judged)})


@torch.inference_mode()
def trace_passage(model, tokenizer, ids: torch.Tensor, config: str = TRACE_CONFIG) -> dict[str, Any]:
    """`config`'s precision trace over one passage (1-D ids) from an empty cache: ``high_fraction`` per layer x
    token, the layer indices, the formats and the token strings."""
    from ..cache import GSQCache
    from ..patch import patched

    cfg = resolve_config(config)
    with patched(model, cfg):
        cache = GSQCache(model.config, cfg, trace=True)
        device = next(p.device for p in model.parameters() if p.device.type != "meta")
        for _ in next_token_logits(model, ids[None].to(device), cache, needs_stepping(model, cfg, None)):
            pass
    trace = cache.precision_trace()
    return {"config": cfg.name, "tokens": [tokenizer.decode([i]) for i in ids.tolist()], "layers": trace["layers"],
            "low_format": trace["low_format"], "high_format": trace["high_format"],
            "high_fraction": trace["high_fraction"][:, :, 0].tolist()}


def _cut_streams(tokenizer, text: str, options: SweepOptions, source: str) -> TokenWindows:
    """``long_stream_streams`` streams of ``long_stream_tokens`` tokens; unset, of `LONG_STREAM_TOKENS` or as many
    as the text holds for that many streams (the built-in text: about 1300)."""
    tokens, count = options.long_stream_tokens, options.long_stream_streams
    try:
        if tokens is not None:
            return make_windows(tokenizer, text, tokens, tokens * count)
        ids = make_windows(tokenizer, text, 2, LONG_STREAM_TOKENS * count).ids.flatten()
        length = min(LONG_STREAM_TOKENS, ids.numel() // count)
        if length < 2:
            raise EvalInputError(f"{ids.numel()} tokens do not make {count} streams of 2 tokens or more; use fewer "
                                 "--long-stream-streams or more text")
        return TokenWindows.from_ids(ids[: count * length].view(count, length), tokenizer)
    except EvalInputError as error:
        raise SweepInputError(f"long streams of {tokens or 'up to ' + str(LONG_STREAM_TOKENS)} tokens from "
                              f"{source}: {error}") from None


def _long_streams(model, streams, name, options, configs, payload, each) -> None:
    """Per-position-bucket records of the `LONG_STREAM` configs on ``streams`` (one batch), with Δ and KL vs
    fp32 per bucket and their standard errors over the streams (`gsq_hf.eval.verdict`)."""
    starts = log_position_buckets(streams.context)
    dname = dataset_name(payload["long_stream_dataset"])
    base = {"model": name, "dataset": dname, "streams": streams.ids.shape[0], "stream_tokens": streams.context}
    group: list[dict[str, Any]] = []
    kept: dict[str, Any] = {}
    for i, (family, cfg) in enumerate(long_stream_configs(configs)):
        group.append(each(f"{name} / long streams of {dname} / {cfg.name}", lambda f=family, c=cfg, i=i: _score(
            model, streams, f, c, base, i == 0, kept, options, batch_size=streams.ids.shape[0],
            position_buckets=starts)))
        payload["long_stream"].append(group[-1])
    fp32 = group[0]
    _add_deltas(group)
    for r in group:
        if r["delta_vs_fp32"] is not None:
            buckets = r["position_buckets"]
            buckets["delta_vs_fp32"], buckets["delta_stderr"] = bucket_deltas(buckets, fp32["position_buckets"])
            if "window_kl_sum" in buckets:
                buckets["kl_stderr"] = bucket_kl_stderr(buckets)


def recall_records(sweep: dict[str, Any], families: list[str], model: str) -> list[dict[str, Any]]:
    """`recall_sweep`'s records with their family, model and the binomial standard error of each recall
    (overall and per gap)."""
    records = []
    for family, record in zip(families, sweep["results"], strict=True):
        r = {"model": model, "family": family, **record, "recall_stderr": binomial_stderr(record["correct"],
                                                                                           record["queries"])}
        for g in r["by_gap"].values():
            g["recall_stderr"] = binomial_stderr(g["correct"], g["queries"])
        records.append(r)
    return records


def _recall_part(directory, spec, options, configs, payload, each) -> None:
    """Recall of every config on one recall model, with binomial standard errors and the verdicts per gap."""
    name = model_name(directory)
    gaps = options.recall_gaps or [spec.gap, 4 * spec.gap]
    model = load_model(directory, options.dtype, options.device)
    info = read_recall_info(directory)
    records: list[dict[str, Any]] = []
    entry = {"model": name, "directory": str(directory), "gaps": gaps, "num": options.recall_num,
             "training_gap": spec.gap, "recall_fp32_trained": info.get("recall_fp32"), "results": records}
    payload["recall"].append(entry)
    start = time.perf_counter()
    for family, cfg in configs:
        def run(cfg=cfg):
            return recall_sweep(model, spec, [cfg], gaps, options.recall_num, batch_size=options.recall_batch_size,
                                progress=False)  # the sweep's own bar counts configs

        sweep = each(f"{name} / recall / {cfg.name}", run)
        entry.update(task=sweep["task"], seed=sweep["seed"])
        records += recall_records(sweep, [family], name)
        add_recall_deltas(records)
        for r in records:
            r["delta_vs_fp32"] = r["delta_vs_first"]
    entry["seconds"] = time.perf_counter() - start
    _verdicts(payload, {"model": name}, records, [("recall", lambda group, **o: recall_verdicts(group, gaps, **o))])
