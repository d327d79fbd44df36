"""Per-token decode time on CPU: patched (GSQ state formats) vs the unpatched model, in one run.

    python scripts/bench_decode_overhead.py --json results/decode_overhead.json

For each model shape, batch size and config, a prompt is prefilled and then ``--steps`` single-token
forwards are timed (``model(token, cache=cache)``, as ``generate`` does). Patched and unpatched runs
alternate over ``--rounds`` rounds on the same weights; the table reports medians and their ratio.
Random weights: the state update cost does not depend on what the weights learned.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

import gsq_hf
from gsq_hf.cli.common import positive, run_script

SHAPES = {
    "mamba-tiny": lambda: MambaForCausalLM(MambaConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2,
                                                       state_size=16)),
    "mamba-medium": lambda: MambaForCausalLM(MambaConfig(vocab_size=8192, hidden_size=768, num_hidden_layers=4,
                                                         state_size=16)),
    "mamba2-tiny": lambda: Mamba2ForCausalLM(Mamba2Config(vocab_size=1024, hidden_size=64, num_hidden_layers=2,
                                                          state_size=16, head_dim=16, num_heads=8, n_groups=1)),
    "mamba2-medium": lambda: Mamba2ForCausalLM(Mamba2Config(vocab_size=8192, hidden_size=768, num_hidden_layers=4,
                                                            state_size=128, head_dim=64, num_heads=24, n_groups=1)),
}


@torch.no_grad()
def time_decode(model, batch: int, steps: int, prompt: int = 8) -> float:
    """Median seconds per single-token forward after a ``prompt``-token prefill."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt + steps), generator=torch.Generator().manual_seed(0))
    cache = model(ids[:, :prompt], use_cache=True).cache
    times = []
    for t in range(prompt, prompt + steps):
        start = time.perf_counter()
        cache = model(ids[:, t : t + 1], cache=cache, use_cache=True).cache
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--configs", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--steps", type=positive, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for shape in args.shapes:
        torch.manual_seed(0)
        model = SHAPES[shape]().eval()
        for batch in args.batch_sizes:
            for config in args.configs:
                base, patched = [], []
                for _ in range(args.rounds):
                    base.append(time_decode(model, batch, args.steps))
                    with gsq_hf.patched(model, config):
                        patched.append(time_decode(model, batch, args.steps))
                row = {"shape": shape, "batch": batch, "config": config,
                       "unpatched_ms": 1e3 * statistics.median(base), "patched_ms": 1e3 * statistics.median(patched)}
                row["ratio"] = row["patched_ms"] / row["unpatched_ms"]
                rows.append(row)
                print(f"{shape:14s} batch {batch:3d} {config:10s} unpatched {row['unpatched_ms']:8.2f} ms  "
                      f"patched {row['patched_ms']:8.2f} ms  ratio {row['ratio']:.2f}", flush=True)
    result = {"benchmark": "decode_overhead", "threads": args.threads, "steps": args.steps, "rounds": args.rounds,
              "versions": {"torch": torch.__version__, "gsq_hf": gsq_hf.__version__}, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_script(main)
