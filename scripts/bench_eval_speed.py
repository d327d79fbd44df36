"""How much slower is decode-faithful evaluation than plain decoding? (target: at most 1.5x)

Both sides step the same windows token by token and score the same next-token logits:

* ``decode-faithful fp32``: `gsq_hf.eval.decode_faithful_perplexity` with the ``fp32`` config (the patched
  mixers, a `GSQCache` written after every token);
* ``unpatched stepping``: the same model, unpatched, fed one token at a time with its own transformers cache.

So the ratio is the overhead of gsq_hf's cache and adapters, not of token-by-token evaluation itself. Runs
alternate and the best of ``--repeats`` is kept (shared machines are noisy). Models are random-weight Mamba
(or Mamba2) built from a config (speed does not depend on the weights), or ``--model`` for a real one.

    python scripts/bench_eval_speed.py --size small --json bench.json
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from gsq_hf.eval.data import TokenWindows, load_model
from gsq_hf.eval.perplexity import decode_faithful_perplexity
from gsq_hf.eval.report import format_table, versions, write_json

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
            batch, cache = batch.to(device), None
            for t in range(windows.context - 1):
                out = model(input_ids=batch[:, t : t + 1], cache=cache, use_cache=True)
                cache = out.cache
                total += F.cross_entropy(out.logits[:, -1].float(), batch[:, t + 1], reduction="none").sum()
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

    faithful, plain = [], []
    for _ in range(args.repeats):
        result = decode_faithful_perplexity(model, windows, "fp32", batch_size=args.batch_size, progress=False)
        faithful.append(result.seconds)
        nll, seconds = unpatched_stepping(model, windows, args.batch_size)
        plain.append(seconds)
    assert abs(result.nll_sum - nll) <= 1e-6 * abs(nll), (result.nll_sum, nll)  # same tokens, same math

    rows = {"decode-faithful fp32": min(faithful), "unpatched stepping": min(plain)}
    ratio = min(faithful) / min(plain)
    print(format_table(["run", "tokens", "best s", "tok/s"],
                 [[name, str(tokens), f"{s:.3f}", f"{tokens / s:,.1f}"] for name, s in rows.items()]))
    print(f"slowdown of decode-faithful fp32 vs unpatched stepping: {ratio:.2f}x (target <= 1.5x)")
    if args.json:
        model_name = args.model or f"random {args.family} {args.size} {SIZES[args.size]}"
        write_json(args.json, {
            "model": model_name, "device": args.device, "threads": args.threads, "context": args.context,
            "windows": args.windows, "batch_size": args.batch_size, "repeats": args.repeats, "tokens": tokens,
            "versions": versions(),
            "results": [{"run": name, "best_seconds": s, "seconds": runs, "tokens_per_second": tokens / s}
                        for (name, s), runs in zip(rows.items(), (faithful, plain), strict=True)],
            "slowdown": ratio,
        })


if __name__ == "__main__":
    main()
