"""``gsq-hf memory``: peak memory of a real generate per config, each in a fresh process."""

from __future__ import annotations

import argparse

from .common import (
    EXIT_FAILURE,
    common_options,
    header,
    info,
    model_source,
    pick_device,
    positive,
    resolve_configs,
)


def add_memory_parser(commands) -> None:
    memory = commands.add_parser(
        "memory", help="peak memory of a real generate per config, patched vs unpatched",
        description="Runs generate once per config (and unpatched), each in a fresh process, and reports the "
                    "peak resident memory (and peak CUDA memory on a GPU) and the state bytes per sequence.")
    common_options(memory)
    memory.add_argument("--new-tokens", type=positive, default=128, help="tokens generated (default: 128)")
    memory.add_argument("--prompt-tokens", type=positive, default=32,
                        help="prompt length, taken from the start of the dataset text (default: 32)")


def run_memory(args: argparse.Namespace) -> int:
    from ..eval.data import load_text, load_tokenizer, make_windows
    from ..eval.memory import measure_configs
    from ..eval.report import memory_table, peak_resolution, write_json

    configs = resolve_configs(args.config, args.seed)
    device = pick_device(args.device)
    source = model_source(args.model)
    text = load_text(args.dataset, args.split)
    prompt = make_windows(load_tokenizer(source), text, args.prompt_tokens, args.prompt_tokens,
                          what="--prompt-tokens").ids[0].tolist()
    info(args, f"model {source} ({args.dtype}, {device}); batch {args.batch_size}, {args.prompt_tokens} prompt + "
                f"{args.new_tokens} new tokens; one process per config, and the unpatched one again last")
    records = measure_configs(source, configs, prompt, batch_size=args.batch_size, new_tokens=args.new_tokens,
                              device=device, dtype=args.dtype, seed=0 if args.seed is None else args.seed,
                              quantization=args.quantization, device_map=args.device_map, threads=args.threads)
    print(memory_table(records, args.batch_size))
    # transformers' own Mamba-1 forward multiplies by dt_proj.weight directly, which fails on a bitsandbytes
    # weight: with --load-in-*bit the unpatched baseline row may fail while every patched row runs.
    baseline_may_fail = args.quantization is not None
    if baseline_may_fail and records[0].get("error"):
        print(f"note: the unpatched model cannot run with {args.quantization} weights here (transformers' Mamba "
              "forward reads dt_proj.weight directly); the patched rows call dt_proj and do")
    if args.json:
        payload = {**header(args, source), "batch_size": args.batch_size, "prompt_tokens": args.prompt_tokens,
                   "new_tokens": args.new_tokens, "device": device, "dtype": args.dtype,
                   "quantization": args.quantization, "device_map": args.device_map, "threads": args.threads,
                   "resolution_bytes": {key: peak_resolution(records, key)
                                        for key in ("peak_rss_bytes", "peak_cuda_bytes")},
                   "results": records}
        write_json(args.json, payload)
        info(args, f"wrote {args.json}")
    checked = [r for r in records[1:] if not r.get("repeat")] if baseline_may_fail else records
    return EXIT_FAILURE if any(r.get("error") for r in checked) else 0

