"""Self-speculative decoding vs plain greedy decoding of the same model, in one run.

    python scripts/bench_speculative.py --json results/speculative.json
    python scripts/bench_speculative.py --model ./my-mamba --dataset ../shared/data/wikitext-2-raw/wiki.test.raw

Prompts are consecutive ``--prompt-tokens`` slices of the evaluation text (default: the built-in model and
its held-out text). For each draft config (``--draft-conv-format`` re-stores the drafts' conv windows too),
lookahead and lookahead rule (fixed, or stopping when the draft's normalized entropy exceeds
``--entropy-threshold``) and each rollback design, it reports the acceptance rate, mean accepted tokens per
verify, tokens/s relative to plain greedy ``generate`` with the target's (fp32) state, the state bytes read and
written per generated token by kind (`gsq_hf.speculative.SpeculativeStats`: draft, target, checkpoints, replay
buffer) and against plain decoding's, and the memory a rollback design holds while verifying. Every
speculative output is checked against the plain output (``exact`` column). A markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

import gsq_hf
from gsq_hf.config import GSQConfig, resolve_config
from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR
from gsq_hf.eval.data import load_model, load_text, load_tokenizer
from gsq_hf.speculative import DRAFT_SYNCS, ROLLBACKS, speculative_generate

BYTE_KINDS = ("draft_state_bytes", "target_state_bytes", "checkpoint_bytes", "replay_write_bytes", "replay_read_bytes")


def rollback_memory(model, lookahead: int, rollback: str) -> int:
    """Bytes the target holds beside its state while verifying ``lookahead`` proposals: the committed state
    (kept to restore or replay from) and, per verified token, a checkpoint or the replay buffer's inputs."""
    tokens = lookahead + 1
    with gsq_hf.patched(model, "fp32"):
        cache = model(torch.zeros(1, 2, dtype=torch.long)).cache
        state = cache.memory_report()["state_bytes"]
        cache.record_inputs()
        model(torch.zeros(1, tokens, dtype=torch.long), cache=cache)
        per_token_inputs = cache.recorded_input_bytes // tokens
    return {"checkpoints": tokens * state, "recompute": state, "replay": state + tokens * per_token_inputs}[rollback]


def draft_config(name: str, conv_format: str) -> GSQConfig:
    config = resolve_config(name)
    if conv_format == "auto":
        return config
    return GSQConfig.from_dict(config.to_dict() | {"name": f"{config.name}+conv-{conv_format}",
                                                   "conv_format": conv_format})


def table(rows: list[dict]) -> str:
    lines = ["| draft | lookahead | rule | rollback | draft sync | acceptance | accepted / verify | speed vs plain | "
             "state B/token: draft + target + checkpoints + replay writes + replay reads = total | vs plain | exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["mode"] == "plain greedy":
            lines.append(f"| plain greedy | - | - | - | - | - | - | 1.00x | {r['state_bytes_per_token']:,.0f} | 1.00 | "
                         "yes |")
            continue
        kinds = " + ".join(f"{r[k]:,.0f}" for k in BYTE_KINDS)
        lines.append(f"| {r['draft']} | {r['lookahead']} | {r['rule']} | {r['rollback']} | {r['draft_sync']} | "
                     f"{r['acceptance_rate']:.2f} | {r['mean_accepted_per_verify']:.2f} | {r['speed_vs_plain']:.2f}x | "
                     f"{kinds} = {r['state_bytes_per_token']:,.0f} | {r['state_bytes_vs_plain']:.2f} | "
                     f"{'yes' if r['exact'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BUILTIN_MODEL_DIR))
    parser.add_argument("--dataset", default="builtin")
    parser.add_argument("--split", default="test")
    parser.add_argument("--drafts", nargs="+", default=["int8", "int4", "gsq-gate", "gsq-budget"])
    parser.add_argument("--draft-conv-format", default="auto",
                        help="conv window format of the drafts ('auto': each config's own, the model dtype)")
    parser.add_argument("--lookaheads", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--rules", nargs="+", choices=["fixed", "entropy"], default=["fixed", "entropy"])
    parser.add_argument("--rollbacks", nargs="+", choices=ROLLBACKS, default=list(ROLLBACKS))
    parser.add_argument("--draft-syncs", nargs="+", choices=DRAFT_SYNCS, default=["once"],
                        help="when the draft takes the target's state: once (after the prompt), after a round with a "
                             "rejection, every round")
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
    rows = [{"mode": "plain greedy", "draft": "-", "lookahead": 0, "rule": "-", "rollback": "-", "draft_sync": "-",
             "tokens_per_second": plain_tps, "speed_vs_plain": 1.0, "acceptance_rate": None,
             "mean_accepted_per_verify": None, "state_bytes_per_token": step_bytes, "state_bytes_vs_plain": 1.0,
             "rollback_memory_bytes": 0, "exact": True}]
    for name in args.drafts:
        draft = draft_config(name, args.draft_conv_format)
        for lookahead in args.lookaheads:
            for rule in args.rules:
                threshold = args.entropy_threshold if rule == "entropy" else None
                for rollback, draft_sync in itertools.product(args.rollbacks, args.draft_syncs):
                    stats, exact, start = [], True, time.perf_counter()
                    for prompt, reference in zip(prompts, plain, strict=True):
                        out = speculative_generate(model, prompt, draft=draft, lookahead=lookahead,
                                                   max_new_tokens=args.new_tokens, entropy_threshold=threshold,
                                                   rollback=rollback, draft_sync=draft_sync)
                        exact &= torch.equal(out.sequences, reference)
                        stats.append(out.stats)
                    seconds = time.perf_counter() - start
                    generated = sum(s.generated for s in stats)
                    drafted, accepted = sum(s.drafted for s in stats), sum(s.accepted for s in stats)
                    per_token = sum(s.state_bytes_moved for s in stats) / generated
                    rows.append({
                        "mode": "speculative", "draft": draft.name, "lookahead": lookahead, "rule": rule,
                        "rollback": rollback, "draft_sync": draft_sync, "tokens_per_second": generated / seconds,
                        "speed_vs_plain": generated / seconds / plain_tps,
                        "acceptance_rate": accepted / drafted if drafted else 0.0,
                        "mean_accepted_per_verify": accepted / sum(s.row_verifies for s in stats),
                        **{kind: sum(getattr(s, kind) for s in stats) / generated for kind in BYTE_KINDS},
                        "state_bytes_per_token": per_token, "state_bytes_vs_plain": per_token / step_bytes,
                        "rollbacks": sum(s.rollbacks for s in stats),
                        "recommitted_tokens": sum(s.recommitted_tokens for s in stats),
                        "rollback_memory_bytes": rollback_memory(model, lookahead, rollback),
                        "exact": bool(exact),
                    })
                    r = rows[-1]
                    print(f"{draft.name:10s} k={lookahead:<2d} {rule:7s} {rollback:11s} sync {draft_sync:11s} accept "
                          f"{r['acceptance_rate']:.2f} acc/verify {r['mean_accepted_per_verify']:.2f} speed "
                          f"{r['speed_vs_plain']:.2f}x state B/token {per_token:.0f} ({r['state_bytes_vs_plain']:.2f}x "
                          f"plain {step_bytes}) exact {r['exact']}", flush=True)
    result = {"benchmark": "speculative", "model": args.model, "dataset": args.dataset, "split": args.split,
              "prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "draft_conv_format": args.draft_conv_format, "threads": args.threads,
              "versions": {"torch": torch.__version__, "gsq_hf": gsq_hf.__version__}, "rows": rows}
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
