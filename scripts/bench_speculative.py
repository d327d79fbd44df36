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
speculative output is checked against the plain output (``exact`` column). A markdown table goes to stdout
(and, with ``--json X.json``, to ``X.md``).

A random-weight model of a decode-cost shape instead (the GPU measurement of issue #22; bench_generate.py's
shapes), a batch of random prompt tokens, timed in interleaved rounds after a warm-up round:

    python scripts/bench_speculative.py --shape mamba2-2.7b-8l --batch-size 64 --json results/spec-b64.json
    python scripts/bench_speculative.py --dry-run      # the plumbing on CPU: tiny shape, one round, no speed claims

Defaults there: plain greedy ``generate`` with the fp32 and int8 states against the recommended draft
(``gsq-4bit+conv-int4-e8m0``: docs/speculative.md) and ``int4``, lookahead 8, replay rollback, bf16 weights
on CUDA. Random weights make the acceptance unrepresentative (it is what the draft's state error does to a random
model's greedy choices); the state-byte ratio is exact either way, and the tokens/s is the cost of a round at
that acceptance.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import gsq_hf
from gsq_hf.cli.common import run_script
from gsq_hf.config import GSQConfig, resolve_config
from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR
from gsq_hf.eval.data import load_model, load_text, load_tokenizer
from gsq_hf.speculative import DRAFT_SYNCS, ROLLBACKS, speculative_generate

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts/bench_generate.py
from bench_generate import DTYPES, SHAPES, sync  # noqa: E402

BYTE_KINDS = ("draft_state_bytes", "target_state_bytes", "checkpoint_bytes", "replay_write_bytes", "replay_read_bytes")
RANDOM_WEIGHTS_NOTE = ("random weights: the acceptance is what the draft's state error does to a random model's greedy "
                       "choices, not a trained model's; the state-byte ratio is exact either way")


def rollback_memory(model, lookahead: int, rollback: str) -> int:
    """Bytes the target holds beside its state while verifying ``lookahead`` proposals, per sequence: the committed
    state (kept to restore or replay from) and, per verified token, a checkpoint or the replay buffer's inputs."""
    tokens, device = lookahead + 1, model.device
    with gsq_hf.patched(model, "fp32"):
        cache = model(torch.zeros(1, 2, dtype=torch.long, device=device)).cache
        state = cache.memory_report()["state_bytes"]
        cache.record_inputs()
        model(torch.zeros(1, tokens, dtype=torch.long, device=device), cache=cache)
        per_token_inputs = cache.recorded_input_bytes // tokens
    return {"checkpoints": tokens * state, "recompute": state, "replay": state + tokens * per_token_inputs}[rollback]


def draft_config(name: str, conv_format: str) -> GSQConfig:
    """A preset or YAML path with its conv window re-stored in ``conv_format`` ('auto': its own); a name
    ``PRESET+conv-FORMAT`` (the name it reports) carries its own conv format."""
    name, _, own_format = name.partition("+conv-")
    conv_format = own_format or conv_format
    config = resolve_config(name)
    if conv_format == "auto":
        return config
    return GSQConfig.from_dict(config.to_dict() | {"name": f"{config.name}+conv-{conv_format}",
                                                   "conv_format": conv_format})


def table(rows: list[dict]) -> str:
    lines = ["| draft | lookahead | rule | rollback | draft sync | acceptance | accepted / verify | tokens/s | "
             "speed vs plain | state B/token: draft + target + checkpoints + replay writes + replay reads = total | "
             "vs plain | exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = r["draft"] if r["mode"] == "speculative" else f"plain greedy ({r['target']})"
        if "error" in r:
            lines.append(f"| {label} | {r['lookahead'] or '-'} | {r['rule']} | {r['rollback']} | {r['draft_sync']} | "
                         f"error: {r['error']} | | | | | | |")
        elif r["mode"] != "speculative":
            lines.append(f"| {label} | - | - | - | - | - | - | {r['tokens_per_second']:,.0f} | "
                         f"{r['speed_vs_plain']:.2f}x | {r['state_bytes_per_token']:,.0f} | "
                         f"{r['state_bytes_vs_plain']:.2f} | {'yes' if r['exact'] else 'NO'} |")
        else:
            kinds = " + ".join(f"{r[k]:,.0f}" for k in BYTE_KINDS)
            lines.append(f"| {label} | {r['lookahead']} | {r['rule']} | {r['rollback']} | {r['draft_sync']} | "
                         f"{r['acceptance_rate']:.2f} | {r['mean_accepted_per_verify']:.2f} | "
                         f"{r['tokens_per_second']:,.0f} | {r['speed_vs_plain']:.2f}x | "
                         f"{kinds} = {r['state_bytes_per_token']:,.0f} | {r['state_bytes_vs_plain']:.2f} | "
                         f"{'yes' if r['exact'] else 'NO'} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(BUILTIN_MODEL_DIR))
    parser.add_argument("--dataset", default="builtin")
    parser.add_argument("--split", default="test")
    parser.add_argument("--shape", choices=list(SHAPES), default=None,
                        help="a random-weight model of this shape (bench_generate.py's) instead of --model")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="--shape: random prompts, decoded as one batch (default 1; --dry-run: 2)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="--shape: weights and activations (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default=None, help="--shape: default cuda when there is one")
    parser.add_argument("--dry-run", action="store_true",
                        help="plumbing check on CPU: --shape mamba2-tiny, 8 new tokens, one round, no speed claims")
    parser.add_argument("--plain-configs", nargs="+", default=None,
                        help="state configs of the plain greedy rows; fp32 (the speculative target) is the baseline")
    parser.add_argument("--drafts", nargs="+", default=None, help="presets or YAML paths; PRESET+conv-FORMAT too")
    parser.add_argument("--draft-conv-format", default="auto",
                        help="conv window format of the drafts ('auto': each config's own, the model dtype)")
    parser.add_argument("--lookaheads", nargs="+", type=int, default=None)
    parser.add_argument("--rules", nargs="+", choices=["fixed", "entropy"], default=None)
    parser.add_argument("--rollbacks", nargs="+", choices=ROLLBACKS, default=None)
    parser.add_argument("--draft-syncs", nargs="+", choices=DRAFT_SYNCS, default=["once"],
                        help="when the draft takes the target's state: once (after the prompt), after a round with a "
                             "rejection, every round")
    parser.add_argument("--entropy-threshold", type=float, default=0.5)
    parser.add_argument("--prompts", type=int, default=4, help="text prompts, each decoded alone (batch 1)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=1,
                        help="timed rounds, every variant once per round (median); --shape: after an untimed warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.shape, args.new_tokens, args.prompt_tokens, args.rounds, args.device = "mamba2-tiny", 8, 8, 1, "cpu"
        args.batch_size = args.batch_size or 2
    args.batch_size = args.batch_size or 1
    if args.shape is None:
        defaults = dict(plain_configs=["fp32"], drafts=["int8", "int4", "gsq-gate", "gsq-budget"], lookaheads=[4, 8],
                        rules=["fixed", "entropy"], rollbacks=list(ROLLBACKS))
    else:
        defaults = dict(plain_configs=["fp32", "int8"], drafts=["gsq-4bit+conv-int4-e8m0", "int4"], lookaheads=[8],
                        rules=["fixed"], rollbacks=["replay"])
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if "fp32" not in args.plain_configs:
        parser.error(f"--plain-configs must include fp32 (the speculative target, the baseline), not only "
                     f"{args.plain_configs}")
    return args


def model_and_prompts(args) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The model, and prompts: slices of the evaluation text (one per call), or one batch of random tokens."""
    if args.shape is None:
        model = load_model(args.model)
        ids = load_tokenizer(args.model)(load_text(args.dataset, args.split), return_tensors="pt").input_ids[0]
        return model, [ids[i * args.prompt_tokens : (i + 1) * args.prompt_tokens][None] for i in range(args.prompts)]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device found; use --device cpu (a tiny --shape) or run on a GPU")
    args.device, args.dtype = str(device), args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    torch.manual_seed(0)
    model = SHAPES[args.shape]().to(device=device, dtype=DTYPES[args.dtype]).eval()
    model.generation_config.eos_token_id = None  # every row decodes --new-tokens tokens, plain and speculative
    model.generation_config.pad_token_id = 0
    ids = torch.randint(2, model.config.vocab_size, (args.batch_size, args.prompt_tokens),
                        generator=torch.Generator().manual_seed(0))
    return model, [ids.to(device)]


def variants(args) -> list[tuple]:
    """("plain", state config) rows, then ("speculative", draft, lookahead, rule, rollback, draft sync) rows."""
    speculative = itertools.product([draft_config(name, args.draft_conv_format) for name in args.drafts],
                                    args.lookaheads, args.rules, args.rollbacks, args.draft_syncs)
    return [("plain", name) for name in args.plain_configs] + [("speculative", *v) for v in speculative]


def decode(model, prompts: list[torch.Tensor], variant: tuple, args) -> tuple[list[torch.Tensor], list]:
    """Every prompt's output sequences under ``variant``, and the speculative calls' stats (none for plain)."""
    if variant[0] == "plain":
        with gsq_hf.patched(model, variant[1]):
            return [model.generate(p, max_new_tokens=args.new_tokens, do_sample=False) for p in prompts], []
    _, draft, lookahead, rule, rollback, draft_sync = variant
    outs = [speculative_generate(model, p, draft=draft, lookahead=lookahead, max_new_tokens=args.new_tokens,
                                 entropy_threshold=args.entropy_threshold if rule == "entropy" else None,
                                 rollback=rollback, draft_sync=draft_sync) for p in prompts]
    return [o.sequences for o in outs], [o.stats for o in outs]


def plain_tokens(outs: list[torch.Tensor], prompts: list[torch.Tensor]) -> int:
    return sum((o.shape[1] - p.shape[1]) * p.shape[0] for o, p in zip(outs, prompts, strict=True))


def identical_rows(outs: list[torch.Tensor], reference: list[torch.Tensor]) -> int:
    return sum(int((o == r).all(1).sum()) if o.shape == r.shape else 0 for o, r in zip(outs, reference, strict=True))


def plain_step_bytes(model, prompts: list[torch.Tensor], config: str) -> int:
    """Plain decoding's state bytes per token per sequence with ``config`` (`memory_report`'s step bytes)."""
    with torch.no_grad(), gsq_hf.patched(model, config):
        return model(prompts[0][:1, :2]).cache.memory_report()["state_bytes_per_step"]


def make_row(model, prompts, variant, runs, last, reference, base_tps, step_bytes, peak) -> dict:
    """One result row from a variant's timed seconds ``runs`` and its ``last`` (outputs, stats)."""
    outs, stats = last
    rows = sum(p.shape[0] for p in prompts)
    same = identical_rows(outs, reference) if reference is not None else None
    common = {"tokens_per_second": None, "rows": rows, "rows_identical_to_plain": same,
              "exact": same == rows if same is not None else None, "seconds": runs, "peak_gib": peak}
    if variant[0] == "plain":
        tps = plain_tokens(outs, prompts) / statistics.median(runs)
        own = plain_step_bytes(model, prompts, variant[1])
        return {"mode": "plain greedy", "target": variant[1], "draft": "-", "lookahead": 0, "rule": "-",
                "rollback": "-", "draft_sync": "-", **common, "tokens_per_second": tps,
                "speed_vs_plain": tps / base_tps,
                "acceptance_rate": None, "mean_accepted_per_verify": None, "state_bytes_per_token": own,
                "state_bytes_vs_plain": own / step_bytes, "rollback_memory_bytes": 0}
    _, draft, lookahead, rule, rollback, draft_sync = variant
    generated = sum(s.generated for s in stats)
    drafted, accepted = sum(s.drafted for s in stats), sum(s.accepted for s in stats)
    per_token = sum(s.state_bytes_moved for s in stats) / generated
    tps = generated / statistics.median(runs)
    return {"mode": "speculative", "target": "fp32", "draft": draft.name, "lookahead": lookahead, "rule": rule,
            "rollback": rollback, "draft_sync": draft_sync, **common, "tokens_per_second": tps,
            "speed_vs_plain": tps / base_tps, "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_per_verify": accepted / sum(s.row_verifies for s in stats),
            **{kind: sum(getattr(s, kind) for s in stats) / generated for kind in BYTE_KINDS},
            "state_bytes_per_token": per_token, "state_bytes_vs_plain": per_token / step_bytes,
            "rollbacks": sum(s.rollbacks for s in stats),
            "recommitted_tokens": sum(s.recommitted_tokens for s in stats),
            "rollback_memory_bytes": rollback_memory(model, lookahead, rollback)}


def error_row(variant: tuple, error: str) -> dict:
    if variant[0] == "plain":
        return {"mode": "plain greedy", "target": variant[1], "draft": "-", "lookahead": 0, "rule": "-",
                "rollback": "-", "draft_sync": "-", "error": error}
    _, draft, lookahead, rule, rollback, draft_sync = variant
    return {"mode": "speculative", "target": "fp32", "draft": draft.name, "lookahead": lookahead, "rule": rule,
            "rollback": rollback, "draft_sync": draft_sync, "error": error}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, prompts = model_and_prompts(args)
    device = prompts[0].device
    warmup = int(args.shape is not None and not args.dry_run)  # round 0: Triton compiles, the allocator grows
    todo = variants(args)
    runs, last, peaks, errors = [[] for _ in todo], {}, {}, {}  # by variant index (configs are unhashable)
    step_bytes = plain_step_bytes(model, prompts, "fp32")
    result = {"benchmark": "speculative", "model": args.shape or args.model,
              "dataset": "random tokens" if args.shape else args.dataset, "split": None if args.shape else args.split,
              "shape": args.shape, "batch_size": prompts[0].shape[0], "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": args.dtype, "dry_run": args.dry_run, "rounds": args.rounds, "warmup_rounds": warmup,
              "prompts": len(prompts), "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "draft_conv_format": args.draft_conv_format, "threads": args.threads,
              "note": RANDOM_WEIGHTS_NOTE if args.shape else None,
              "versions": {"torch": torch.__version__, "gsq_hf": gsq_hf.__version__}, "rows": []}
    for round_ in range(warmup + args.rounds):
        for i, variant in enumerate(todo):
            if i in errors:
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                with torch.no_grad():
                    sync(device)
                    start = time.perf_counter()
                    last[i] = decode(model, prompts, variant, args)
                    sync(device)
            except Exception as error:  # one failing variant must not end the run
                traceback.print_exc(limit=3)
                errors[i] = f"{type(error).__name__}: {error}"
                continue
            seconds = time.perf_counter() - start
            if round_ >= warmup:
                runs[i].append(seconds)
            if device.type == "cuda":
                peaks[i] = torch.cuda.max_memory_allocated(device) / 2**30
            name = variant[1] if variant[0] == "plain" else variant[1].name
            print(f"round {round_}{' (warm-up)' if round_ < warmup else ''} {variant[0]} {name} {variant[2:]} "
                  f"{seconds:.2f} s", flush=True)
    base = todo.index(("plain", "fp32"))
    reference = last[base][0] if runs[base] else None
    base_tps = plain_tokens(reference, prompts) / statistics.median(runs[base]) if runs[base] else float("nan")
    for i, variant in enumerate(todo):
        if not runs[i]:
            result["rows"].append(error_row(variant, errors.get(i, "no timed run")))
            continue
        result["rows"].append(make_row(model, prompts, variant, runs[i], last[i], reference, base_tps, step_bytes,
                                       peaks.get(i)))
    header = (f"{result['model']}, batch {result['batch_size']}, {result['device_name']}, "
              f"{args.dtype or 'fp32'} weights, {args.new_tokens} new tokens, median of {args.rounds} round(s)"
              + (f"; {RANDOM_WEIGHTS_NOTE}" if args.shape else "")
              + (" (dry run: no speed claims)" if args.dry_run else ""))
    print(header, table(result["rows"]), sep="\n\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        args.json.with_suffix(".md").write_text(f"{header}\n\n{table(result['rows'])}\n")


if __name__ == "__main__":
    run_script(main)
