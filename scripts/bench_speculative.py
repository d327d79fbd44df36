"""Self-speculative decoding vs plain greedy decoding of the same model, in one run.

    python scripts/bench_speculative.py --json results/speculative.json
    python scripts/bench_speculative.py --model ./my-mamba --dataset ../shared/data/wikitext-2-raw/wiki.test.raw

Prompts are consecutive ``--prompt-tokens`` slices of the evaluation text (default: the built-in model and
its held-out text). For each draft config, lookahead and lookahead rule (fixed, or stopping when the
draft's normalized entropy exceeds ``--entropy-threshold``) and each rollback design, it reports the
acceptance rate, mean accepted tokens per verify, tokens/s relative to plain greedy ``generate`` with the
target's (fp32) state, state bytes read+written per generated token, and the peak bytes of per-token
checkpoints. Every speculative output is checked against the plain output (``exact`` column).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import gsq_hf
from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR
from gsq_hf.eval.data import load_model, load_text, load_tokenizer
from gsq_hf.speculative import speculative_generate


def checkpoint_bytes(model, draft_lookahead: int) -> int:
    """Bytes the target keeps during one verify with per-token checkpoints: lookahead + 1 full states."""
    with gsq_hf.patched(model, "fp32"):
        cache = model(torch.zeros(1, 2, dtype=torch.long)).cache
        return (draft_lookahead + 1) * cache.memory_report()["state_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BUILTIN_MODEL_DIR))
    parser.add_argument("--dataset", default="builtin")
    parser.add_argument("--split", default="test")
    parser.add_argument("--drafts", nargs="+", default=["int8", "int4", "gsq-gate", "gsq-budget"])
    parser.add_argument("--lookaheads", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--entropy-threshold", type=float, default=0.5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    ids = tokenizer(load_text(args.dataset, args.split), return_tensors="pt").input_ids[0]
    prompts = [ids[i * args.prompt_tokens : (i + 1) * args.prompt_tokens][None] for i in range(args.prompts)]

    with torch.no_grad(), gsq_hf.patched(model, "fp32"):
        start = time.perf_counter()
        plain = [model.generate(p, max_new_tokens=args.new_tokens, do_sample=False) for p in prompts]
        plain_seconds = time.perf_counter() - start
        plain_tokens = sum(o.shape[1] - p.shape[1] for o, p in zip(plain, prompts, strict=True))
        step_bytes = model(prompts[0][:, :2]).cache.memory_report()["state_bytes_per_step"]
    plain_tps = plain_tokens / plain_seconds
    rows = [{"mode": "plain greedy", "draft": "-", "lookahead": 0, "rule": "-", "rollback": "-",
             "tokens_per_second": plain_tps, "speed_vs_plain": 1.0, "acceptance_rate": None,
             "mean_accepted_per_verify": None, "state_bytes_per_token": step_bytes, "checkpoint_bytes": 0,
             "exact": True}]
    for draft in args.drafts:
        for lookahead in args.lookaheads:
            for rule, threshold in (("fixed", None), ("entropy", args.entropy_threshold)):
                for rollback in ("checkpoints", "recompute"):
                    stats, exact, start = [], True, time.perf_counter()
                    for prompt, reference in zip(prompts, plain, strict=True):
                        out = speculative_generate(model, prompt, draft=draft, lookahead=lookahead,
                                                   max_new_tokens=args.new_tokens, entropy_threshold=threshold,
                                                   rollback=rollback)
                        exact &= torch.equal(out.sequences, reference)
                        stats.append(out.stats)
                    seconds = time.perf_counter() - start
                    generated = sum(s.generated for s in stats)
                    drafted, accepted = sum(s.drafted for s in stats), sum(s.accepted for s in stats)
                    rows.append({
                        "mode": "speculative", "draft": draft, "lookahead": lookahead, "rule": rule,
                        "rollback": rollback, "tokens_per_second": generated / seconds,
                        "speed_vs_plain": generated / seconds / plain_tps,
                        "acceptance_rate": accepted / drafted if drafted else 0.0,
                        "mean_accepted_per_verify": accepted / sum(s.verify_steps for s in stats),
                        "state_bytes_per_token": sum(s.state_bytes_moved for s in stats) / generated,
                        "checkpoint_bytes": checkpoint_bytes(model, lookahead) if rollback == "checkpoints" else 0,
                        "exact": bool(exact),
                    })
                    r = rows[-1]
                    print(f"{draft:10s} k={lookahead:<2d} {rule:7s} {rollback:11s} accept {r['acceptance_rate']:.2f} "
                          f"acc/verify {r['mean_accepted_per_verify']:.2f} speed {r['speed_vs_plain']:.2f}x "
                          f"state B/token {r['state_bytes_per_token']:.0f} (plain {step_bytes}) "
                          f"exact {r['exact']}", flush=True)
    result = {"benchmark": "speculative", "model": args.model, "dataset": args.dataset, "split": args.split,
              "prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "threads": args.threads, "versions": {"torch": torch.__version__, "gsq_hf": gsq_hf.__version__},
              "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
