"""``gsq-hf eval``: decode-faithful perplexity of each state config on one model and dataset."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import GSQConfig
from .common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    BadInput,
    check_configs,
    common_options,
    header,
    info,
    interrupted,
    model_source,
    one_line,
    output_dir,
    pick_device,
    positive,
    resolve_configs,
    run_configs,
    set_threads,
)


def add_eval_parser(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="decode-faithful perplexity of each state config",
        description="Perplexity with the model's states stored per each config after every token, as generate "
                    "stores them: static, gate and budget configs through multi-token forwards whose scan stores "
                    "after every token, entropy configs (and --stepped) one token per forward. Windows of "
                    "--context tokens do not overlap; the first token of each is read, the others scored.")
    common_options(evaluate)
    evaluate.add_argument("--context", type=positive, default=512, help="tokens per window (default: 512)")
    evaluate.add_argument("--max-tokens", type=positive, help="evaluate only the first N tokens (default: all)")
    evaluate.add_argument("--no-reference", action="store_true",
                          help="skip the unpatched full-sequence reference perplexity")
    evaluate.add_argument("--stepped", action="store_true",
                          help="feed every config one token per forward (default: only where a multi-token "
                               "forward would store other states: entropy policies, end_of_forward)")
    evaluate.add_argument("--kl-top-k", type=int, default=64, metavar="K",
                          help="score every config after the first by KL(first ‖ config) per token and top-1 "
                               "agreement, over the first config's top K next-token logits and one bin for the "
                               "rest (a lower bound of the full KL; default: 64; 0: off)")
    evaluate.add_argument("--plot", type=output_dir, metavar="DIR",
                          help="save pareto.png (perplexity vs average stored state bits, per config) and, for "
                               "each dynamic policy, trace-CONFIG.png (its precision per layer and token over "
                               "the first batch of windows) in DIR (needs matplotlib)")


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..cache import weight_bytes
    from ..eval.data import load_model, load_text, load_tokenizer, make_windows
    from ..eval.distributed import Processes
    from ..eval.perplexity import (
        NonFiniteLogitsError,
        decode_faithful_perplexity,
        full_sequence_perplexity,
        reference_options,
    )
    from ..eval.report import add_deltas, eval_table, failed_record, weights_line, write_json

    configs = resolve_configs(args.config, args.seed)
    processes = Processes(pick_device(args.device))  # one, unless started by torchrun / accelerate launch
    device, main = processes.device, processes.is_main
    if processes.count > 1 and args.device_map is not None:
        raise BadInput("--device-map spreads one model over devices; with several processes each process "
                       "evaluates on its own device: drop --device-map or launch one process")
    args.quiet = args.quiet or not main  # progress and run information from the main process only
    source = model_source(args.model)
    if args.plot:
        require_matplotlib()
    if args.kl_top_k < 0:
        raise BadInput(f"--kl-top-k must be 0 (off) or a positive number of logits, got {args.kl_top_k}")
    torch.manual_seed(0 if args.seed is None else args.seed)
    text = load_text(args.dataset, args.split)
    windows = make_windows(load_tokenizer(source), text, args.context, args.max_tokens)
    model = load_model(source, args.dtype, device, quantization=args.quantization, device_map=args.device_map)
    threads = set_threads(args, model)
    check_configs(model, configs, windows.ids)
    shard = processes.shard(windows, args.batch_size)  # whole batches of windows, contiguous
    info(args, f"model {source} ({args.dtype}, {device}, {threads} thread{'s' * (threads > 1)}); dataset "
                f"{args.dataset or 'builtin'}:{args.split}; {windows.ids.shape[0]} windows x {windows.context} "
                f"tokens, {windows.scored_tokens} scored" + (f"; {processes.count} processes" if processes.count > 1
                                                            else ""))
    progress = not args.quiet

    traces: dict[str, dict[str, Any]] = {}
    kept: dict[str, Any] = {}  # the first config's top-k logits, this process's windows

    def attempt(label: str, evaluate, *config: GSQConfig, **options) -> dict[str, Any]:
        """The run's record, or an error record: one config's non-finite logits do not stop the others."""
        result, failure = None, None
        try:
            if shard.ids.shape[0]:  # a process can be left without a batch
                result = evaluate(model, shard, *config, batch_size=args.batch_size, progress=progress, **options)
        except NonFiniteLogitsError as error:
            failure = str(error)
        result, failure = processes.combine(result, failure)  # gathered over processes (no-op for one)
        if failure is not None:
            return failed_record(label, windows.scored_tokens, failure)
        if getattr(result, "trace", None) is not None:
            traces[label] = result.trace
        if getattr(result, "reference", None) is not None:
            kept["reference"] = result.reference
        return result.to_dict()

    weights = weight_bytes(model)
    records: list[dict[str, Any]] = []
    payload = {**header(args, source), "context": windows.context, "windows": windows.ids.shape[0],
               "batch_size": args.batch_size, "max_tokens": args.max_tokens, "device": device, "dtype": args.dtype,
               "quantization": args.quantization, "device_map": args.device_map, "processes": processes.count,
               "threads": threads, "weight_bytes": weights, "kl_top_k": args.kl_top_k,
               "scoring": "non-overlapping windows; token 0 of each window read, tokens 1..context-1 scored",
               "configs": [cfg.name for cfg in configs], "results": records}

    def run(i: int, cfg: GSQConfig) -> None:
        record = attempt(cfg.name, decode_faithful_perplexity, cfg, stepped=True if args.stepped else None,
                         **reference_options(model, i == 0, kept.get("reference"), args.kl_top_k),
                         **({"trace": True} if args.plot and cfg.build_policy().high is not None else {}))
        state = record.get("state_bytes")  # what one batch needs in all: the weights plus its sequences' state
        record["weight_bytes"] = weights
        record["weights_plus_batch_state_bytes"] = None if state is None else weights + args.batch_size * state
        records.append(record)
        add_deltas(records)

    finished = run_configs(args, configs, run, payload, write=main)
    table = eval_table(records, args.kl_top_k or None, legend=not args.quiet)
    if not finished:
        processes.close()
        return interrupted(args, payload, table) if main else EXIT_INTERRUPTED
    if main:
        print(table)
    if not args.no_reference:
        try:
            reference = attempt("reference", full_sequence_perplexity)
            records = [*records, reference]
        except RuntimeError as error:  # transformers' Mamba-1 forward multiplies by dt_proj.weight directly
            if args.quantization is None:
                raise
            reference = failed_record("reference", windows.scored_tokens, "not available: the unpatched model "
                                      f"cannot run {args.quantization} bitsandbytes weights ({one_line(error)})")
        payload["reference"] = reference
        value = "FAILED (" + reference["error"] + ")" if "error" in reference else f"{reference['perplexity']:.4f}"
        if main:
            print(f"reference (unpatched model, one full-sequence forward per window): ppl {value}")
    if main:
        print(weights_line(payload["results"], weights, args.batch_size, args.quantization or args.dtype))
    processes.close()
    if not main:
        return EXIT_FAILURE if any(r.get("error") for r in records) else 0
    payload["status"] = "complete"  # every config ran; those whose logits went NaN/Inf are listed
    payload["failed_configs"] = [r["config"] for r in payload["results"] if r.get("error")]
    if args.json:
        write_json(args.json, payload)
        info(args, f"wrote {args.json}")
    if args.plot:
        for path in save_plots(args.plot, payload, traces):
            info(args, f"wrote {path}")
    return EXIT_FAILURE if any(r.get("error") for r in records) else 0


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInput('--plot needs matplotlib; pip install "gsq_hf[plot]"') from None


def save_plots(directory: str, payload: dict[str, Any], traces: dict[str, dict[str, Any]]) -> list:
    """``pareto.png`` and one ``trace-<config>.png`` per traced config in ``directory``; the paths written."""
    import re
    from pathlib import Path

    from .. import plot

    directory = Path(directory)
    where = f"{Path(payload['model']).name} on {payload['dataset']}:{payload['split']}, context {payload['context']}"
    scored = any(r.get("perplexity") is not None for r in payload["results"])  # every config failed: no points
    figures = {"pareto.png": plot.pareto(payload, title=f"state bits vs perplexity — {where}")} if scored else {}
    for name, trace in traces.items():
        file = "trace-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png"
        rows = trace["high_fraction"].shape[2]
        figures[file] = plot.precision_trace(trace, title=f"{name} — precision trace, mean over the first {rows} "
                                                          "windows")
    paths = []
    for file, figure in figures.items():
        plot.save(figure, directory / file)
        paths.append(directory / file)
    return paths

