"""How fast is decode-faithful evaluation: chunked forwards vs token-by-token stepping vs the unpatched model.

Every run scores the same windows' next-token logits:

* ``chunked <config>``: `gsq_hf.eval.decode_faithful_perplexity` in its default mode for static/gate/budget
  configs: multi-token forwards whose patched scan stores the state after every token (decode-faithful);
* ``stepped <config>``: the same with ``stepped=True``: one token per forward, as ``generate`` feeds them;
* ``unpatched stepping``: the unpatched model fed one token at a time with its own transformers cache;
* ``unpatched forward``: the unpatched model, one full-sequence forward per batch (no state stored at all).

Runs are interleaved, ``--repeats`` times, and the median of each is kept (shared machines are noisy);
ratios come from one run of the script. Targets: chunked int8 >= 5x faster than stepped int8; stepped fp32
<= 1.5x unpatched stepping. Models are random-weight Mamba (or Mamba2) built from a config (speed does not
depend on the weights), or ``--model`` for a real one.

    python scripts/bench_eval_speed.py --size small --json bench.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from gsq_hf.cli.common import run_script
from gsq_hf.eval.data import TokenWindows, load_model
from gsq_hf.eval.perplexity import decode_faithful_perplexity, full_sequence_perplexity
from gsq_hf.eval.report import format_table, versions, write_json
from gsq_hf.eval.stepping import next_token_logits

SIZES = {  # (hidden, layers, d_state, vocab)
    "tiny": (64, 2, 16, 1024),
    "small": (256, 4, 16, 8192),
}


def build(family: str, size: str) -> torch.nn.Module:
    hidden, layers, state, vocab = SIZES[size]
    torch.manual_seed(0)
    if family == "mamba":
        config = MambaConfig(vocab_size=vocab, hidden_size=hidden, state_size=state, num_hidden_layers=layers)
        return MambaForCausalLM(config).eval()
    config = Mamba2Config(vocab_size=vocab, hidden_size=hidden, state_size=state, num_hidden_layers=layers,
                          num_heads=2 * hidden // 64, head_dim=64, n_groups=1)
    return Mamba2ForCausalLM(config).eval()


def unpatched_stepping(model: torch.nn.Module, windows: TokenWindows, batch_size: int) -> tuple[float, float]:
    """(ΣNLL, seconds) of the unpatched model fed each window one token at a time with its own cache."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in windows.ids.split(batch_size):
            batch = batch.to(device)
            for t, logits in next_token_logits(model, batch[:, :-1], DynamicCache(config=model.config), stepped=True):
                total += F.cross_entropy(logits[0], batch[:, t + 1], reduction="none").sum()
        nll = float(total)
    return nll, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("mamba", "mamba2"), default="mamba")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny", help="random model size (default: tiny)")
    parser.add_argument("--model", help="a real model (directory or Hub id) instead of a random one")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=["fp32", "int8"], help="state configs (default: fp32 int8)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device) if args.model else build(args.family, args.size).to(args.device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.windows, args.context), generator=generator)
    zeros = torch.zeros(args.windows, dtype=torch.int64)
    windows = TokenWindows(ids, zeros, zeros)  # word/byte counts are not needed for speed
    tokens = windows.scored_tokens

    runs: dict[str, list[float]] = {}
    nll: dict[str, float] = {}

    def timed(name: str, run) -> None:
        value, seconds = run()
        runs.setdefault(name, []).append(seconds)
        nll[name] = value

    def evaluate(config: str, stepped: bool):
        result = decode_faithful_perplexity(model, windows, config, batch_size=args.batch_size, progress=False,
                                            stepped=stepped)
        return result.nll_sum, result.seconds

    def forward():
        result = full_sequence_perplexity(model, windows, batch_size=args.batch_size, progress=False)
        return result.nll_sum, result.seconds

    for _ in range(args.repeats):
        for config in args.configs:
            timed(f"chunked {config}", lambda config=config: evaluate(config, False))
            timed(f"stepped {config}", lambda config=config: evaluate(config, True))
        timed("unpatched stepping", lambda: unpatched_stepping(model, windows, args.batch_size))
        timed("unpatched forward", forward)
    for config in args.configs:  # the two modes store the same states: equal up to rounding-boundary flips
        assert abs(nll[f"chunked {config}"] - nll[f"stepped {config}"]) <= 1e-4 * abs(nll[f"stepped {config}"])

    median = {name: statistics.median(seconds) for name, seconds in runs.items()}
    base = median["unpatched stepping"]
    print(format_table(["run", "tokens", "median s", "tok/s", "vs unpatched stepping"],
                       [[name, str(tokens), f"{s:.3f}", f"{tokens / s:,.1f}", f"{s / base:.2f}x"]
                        for name, s in median.items()]))
    speedups = {config: median[f"stepped {config}"] / median[f"chunked {config}"] for config in args.configs}
    for config, speedup in speedups.items():
        print(f"chunked vs stepped {config}: {speedup:.1f}x faster (target >= 5x)")
    if args.json:
        model_name = args.model or f"random {args.family} {args.size} {SIZES[args.size]}"
        write_json(args.json, {
            "model": model_name, "device": args.device, "threads": args.threads, "context": args.context,
            "windows": args.windows, "batch_size": args.batch_size, "repeats": args.repeats, "tokens": tokens,
            "versions": versions(),
            "results": [{"run": name, "median_seconds": median[name], "seconds": seconds,
                         "tokens_per_second": tokens / median[name], "vs_unpatched_stepping": median[name] / base}
                        for name, seconds in runs.items()],
            "chunked_speedup": speedups,
        })


if __name__ == "__main__":
    run_script(main)
