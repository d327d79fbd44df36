"""End-to-end ``generate`` throughput: patched (per state config) vs the unpatched model, in one run.

    python scripts/bench_generate.py --json results/bench_generate.json            # a GPU: mamba-130m shape
    python scripts/bench_generate.py --shapes mamba-tiny --batch-sizes 2 --new-tokens 4 --device cpu

A random model of the given shape (the cost of a decode step does not depend on trained weights) generates
``--new-tokens`` tokens greedily after a ``--prompt``-token prompt, at each batch size; every config is timed
``--rounds`` times (median) after one warm-up ``generate``, alternating with the unpatched model. On CUDA the
quantized configs take the fused Triton state update (``GSQConfig.kernel='auto'``); ``--torch-path`` adds
each config again with ``kernel='torch'`` (dequantize → update → quantize in separate torch ops). ``--graph``
decodes with `gsq_hf.generate_graph` (a static cache, the decode step captured in a CUDA graph) and the
unpatched model through the same captured loop (transformers' cache, written in place upstream): each call
pays its prompt forward, two eager steps and one capture, like ``generate`` its prompt forward, so use enough
``--new-tokens`` to amortize them; on CPU the same loop runs eagerly (``--dry-run``: tiny shapes, one round, no
speed claims). Columns:
tokens/s (batch × new tokens / seconds), its ratio to the unpatched model, peak memory (CUDA) and the
cache's state bytes per sequence. Writes JSON (``--json``) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
import traceback
from pathlib import Path

import torch
from transformers import DynamicCache, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

import gsq_hf
from gsq_hf import GSQCache
from gsq_hf.cli.common import run_script
from gsq_hf.config import resolve_config
from gsq_hf.graph import _Decode

SHAPES = {  # the state-spaces mamba-130m / mamba2-130m shapes, and tiny ones for CPU checks
    "mamba-130m": lambda: MambaForCausalLM(MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=24,
                                                       state_size=16)),
    "mamba2-130m": lambda: Mamba2ForCausalLM(Mamba2Config(vocab_size=50280, hidden_size=768, num_hidden_layers=24,
                                                          state_size=128, head_dim=64, num_heads=24, n_groups=1)),
    "mamba2-2.7b-8l": lambda: Mamba2ForCausalLM(Mamba2Config(vocab_size=50280, hidden_size=2560, num_hidden_layers=8,
                                                             state_size=128, head_dim=64, num_heads=80, n_groups=1)),
    "mamba-tiny": lambda: MambaForCausalLM(MambaConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2,
                                                       state_size=16)),
    "mamba2-tiny": lambda: Mamba2ForCausalLM(Mamba2Config(vocab_size=1024, hidden_size=64, num_hidden_layers=2,
                                                          state_size=16, head_dim=16, num_heads=8, n_groups=1)),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["mamba-130m"], choices=list(SHAPES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--configs", nargs="+", default=["fp32", "bf16", "int8", "int4", "gsq-gate"],
                        help="preset names or YAML paths")
    parser.add_argument("--torch-path", action="store_true", help="also time each config with kernel='torch'")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="model weights and activations")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--graph", action="store_true",
                        help="decode in a captured CUDA graph (gsq_hf.generate_graph; eager on CPU)")
    parser.add_argument("--dry-run", action="store_true",
                        help="plumbing check on CPU: tiny shapes, batch 2, 4 new tokens, one round (no speed claims)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed_generate(model, ids: torch.Tensor, new_tokens: int, config, graph: bool = False) -> tuple[float, dict]:
    """Seconds of one greedy ``generate`` of exactly ``new_tokens`` tokens, and its cache's memory report.

    ``graph``: `gsq_hf.generate_graph` on a static cache (patched), or the same captured loop on transformers'
    cache (unpatched); no EOS, so every run decodes ``new_tokens`` tokens, as ``min_new_tokens`` makes generate.
    """
    cache = GSQCache(model, config, static=graph) if config is not None else None
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if cache is not None:
        kwargs["cache"] = cache
    sync(ids.device)
    start = time.perf_counter()
    if not graph:
        model.generate(ids, **kwargs)
    elif cache is not None:
        gsq_hf.generate_graph(model, ids, new_tokens, cache=cache, eos_token_id=[], check_every=new_tokens)
    else:  # the unpatched model through the same loop: transformers' cache writes its states in place
        _Decode(model, ids, None, new_tokens, None, 0, new_tokens)(DynamicCache(config=model.config), ids.is_cuda)
    sync(ids.device)
    seconds = time.perf_counter() - start
    return seconds, cache.memory_report() if cache is not None else {}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        args.shapes, args.batch_sizes, args.new_tokens, args.rounds, args.device = (
            [s for s in args.shapes if s.endswith("tiny")] or ["mamba-tiny", "mamba2-tiny"], [2], 4, 1, "cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device found; use --device cpu (tiny shapes) or run on a GPU")
    variants = [(name, resolve_config(name)) for name in args.configs]
    if args.torch_path:
        variants += [(f"{name}/torch", dataclasses.replace(config, kernel="torch")) for name, config in list(variants)]
    result = {"benchmark": "generate", "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "graph": args.graph, "dry_run": args.dry_run, "dtype": args.dtype, "prompt": args.prompt,
              "new_tokens": args.new_tokens,
              "rounds": args.rounds, "versions": {"torch": torch.__version__, "gsq_hf": gsq_hf.__version__},
              "rows": []}
    print(f"{'shape':12s} {'batch':>5s} {'config':16s} {'tok/s':>10s} {'×unpatched':>10s} {'peak GiB':>9s} "
          f"{'state MB/seq':>12s}", flush=True)
    for shape in args.shapes:
        torch.manual_seed(0)
        model = SHAPES[shape]().to(device=device, dtype=DTYPES[args.dtype]).eval()
        for batch in args.batch_sizes:
            ids = torch.randint(2, model.config.vocab_size, (batch, args.prompt),
                                generator=torch.Generator().manual_seed(0)).to(device)
            runs = {name: [] for name in ["unpatched", *(n for n, _ in variants)]}
            peaks, reports, errors = {}, {}, {}
            for round_ in range(args.rounds + 1):  # round 0 warms up (Triton compiles, allocator grows)
                for name in runs:
                    config = dict(variants).get(name)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    try:
                        if config is None:
                            seconds, _ = timed_generate(model, ids, args.new_tokens, None, args.graph)
                        else:
                            with gsq_hf.patched(model, config):
                                seconds, reports[name] = timed_generate(model, ids, args.new_tokens, config,
                                                                        args.graph)
                    except Exception as error:  # one failing config must not end the run
                        traceback.print_exc(limit=3)
                        errors[name] = f"{type(error).__name__}: {error}"
                        continue
                    if round_:
                        runs[name].append(seconds)
                    if device.type == "cuda":
                        peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30
            base = batch * args.new_tokens / statistics.median(runs["unpatched"]) if runs["unpatched"] else math.nan
            for name, times in runs.items():
                if not times:
                    result["rows"].append(dict(shape=shape, batch=batch, config=name, error=errors.get(name)))
                    print(f"{shape:12s} {batch:5d} {name:16s} error: {errors.get(name)}", flush=True)
                    continue
                tps = batch * args.new_tokens / statistics.median(times)
                report = reports.get(name, {})
                row = dict(shape=shape, batch=batch, config=name, tokens_per_s=tps, ratio_to_unpatched=tps / base,
                           seconds=times, peak_gib=peaks.get(name),
                           state_bytes_per_sequence=report.get("state_bytes", 0) / batch if report else None)
                result["rows"].append(row)
                peak = f"{row['peak_gib']:9.2f}" if row["peak_gib"] is not None else f"{'—':>9s}"
                state = (f"{row['state_bytes_per_sequence'] / 1e6:12.2f}" if row["state_bytes_per_sequence"]
                         else f"{'—':>12s}")
                print(f"{shape:12s} {batch:5d} {name:16s} {tps:10.0f} {tps / base:10.2f} {peak} {state}", flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=2))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    run_script(main)
