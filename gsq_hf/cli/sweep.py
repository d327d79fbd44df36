"""``gsq-hf sweep``: the config grid over models, datasets, LAMBADA, long streams and recall, with verdicts."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import EXIT_FAILURE, EXIT_INTERRUPTED, info, int_list, json_file, pick_device, positive, recall_model


def add_sweep_parser(commands) -> None:
    sweep = commands.add_parser(
        "sweep", help="the config grid over models and datasets (+ LAMBADA, long streams, recall) with verdicts",
        description="Every config of the grid (uniform formats, stochastic rounding, composed formats and their "
                    "presets, dynamic policies across their knobs), decode-faithfully on the same windows of each "
                    "model x dataset, with KL vs fp32; LAMBADA last-word scores for a lambada*.jsonl dataset; long "
                    "streams scored per position bucket; recall on the recall models; whether each dynamic or "
                    "composed config beats the uniform front at equal bits. Writes all of it to --json; "
                    "scripts/results.py turns that into docs/results.md.")
    sweep_arguments(sweep)
    sweep.add_argument("--json", type=json_file, metavar="FILE",
                       help="write the payload to FILE, after every config (a crash or Ctrl-C keeps the finished ones)")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar or config counter, only the table")
    sweep.add_argument("--debug", action="store_true", help="show library logs and full tracebacks")


def sweep_arguments(sweep: argparse.ArgumentParser) -> None:
    """The options that choose what a sweep runs (shared with scripts/results.py)."""
    from ..eval.sweep import FAMILIES

    sweep.add_argument("--model", action="append", help="model dir or Hub id (repeatable; default: the built-in)")
    sweep.add_argument("--dataset", action="append",
                       help="'builtin' (default), a text file, a .jsonl (a lambada*.jsonl also gets LAMBADA "
                            "scores), ... (repeatable)")
    sweep.add_argument("--families", type=_families, metavar="F[,F...]",
                       help="comma-separated families to run (default: all; fp32 always runs first): "
                            + ", ".join(FAMILIES))
    sweep.add_argument("--max-tokens", type=positive, default=16384, help="tokens per dataset (default: 16384)")
    sweep.add_argument("--context", type=positive, default=512, help="window length (default: 512)")
    sweep.add_argument("--batch-size", type=positive, default=8, help="windows run at once (default: 8)")
    sweep.add_argument("--kl-top-k", type=_non_negative, default=64, metavar="K",
                       help="fp32 logits kept per token for KL vs fp32 (default: 64; 0: no KL)")
    sweep.add_argument("--stepped", action="store_true",
                       help="feed every config one token per forward (default: only where chunked forwards would "
                            "store other states)")
    sweep.add_argument("--lambada-examples", type=positive, default=500, help="LAMBADA examples (default: 500)")
    sweep.add_argument("--trace-tokens", type=positive, default=64, help="tokens of the traced passage (default: 64)")
    sweep.add_argument("--long-stream-tokens", type=_non_negative,
                       help="tokens per long stream, one cache over each (default: 16384, or as many as the text "
                            "holds for --long-stream-streams streams; 0: no long streams)")
    sweep.add_argument("--long-stream-streams", type=positive, default=8,
                       help="long streams run as one batch (default: 8)")
    sweep.add_argument("--long-stream-dataset", help="text cut into long streams (default: the first non-LAMBADA "
                                                     "--dataset)")
    sweep.add_argument("--recall-model", action="append", type=recall_model,
                       help="recall model dir, or recall-mamba / recall-mamba2 (those that ship; repeatable; "
                            "default: both)")
    sweep.add_argument("--recall-num", type=_non_negative, default=256,
                       help="MQAR sequences per gap (default: 256; 0: no recall)")
    sweep.add_argument("--recall-gaps", type=int_list, metavar="G[,G...]",
                       help="filler gaps (default: each recall model's training gap and 4x it)")
    sweep.add_argument("--recall-batch-size", type=positive, default=64, help="MQAR sequences at once (default: 64)")
    sweep.add_argument("--recall-only", action="store_true", help="only the recall part")
    sweep.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    sweep.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="model weights dtype")
    sweep.add_argument("--threads", type=positive, metavar="N",
                       help="intra-op CPU threads (default: 1: per-token ops of small models only contend)")


def _families(text: str) -> list[str]:
    return [f.strip() for f in text.split(",") if f.strip()]


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {value}")
    return value


def sweep_options(args: argparse.Namespace):
    """The `SweepOptions` of parsed ``gsq-hf sweep`` arguments."""
    from ..eval.sweep import SweepOptions

    options = SweepOptions(
        families=args.families, context=args.context, max_tokens=args.max_tokens, batch_size=args.batch_size,
        kl_top_k=args.kl_top_k, lambada_examples=args.lambada_examples, trace_tokens=args.trace_tokens,
        long_stream_tokens=args.long_stream_tokens, long_stream_streams=args.long_stream_streams,
        long_stream_dataset=args.long_stream_dataset, recall_models=args.recall_model, recall_num=args.recall_num,
        recall_gaps=args.recall_gaps, recall_batch_size=args.recall_batch_size, recall_only=args.recall_only,
        stepped=True if args.stepped else None, device=args.device, dtype=args.dtype)
    if args.model:
        options.models = args.model
    if args.dataset:
        options.datasets = args.dataset
    return options


def run_sweep(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..eval.report import format_table, write_json
    from ..eval.sweep import run_sweep as sweep
    from ..eval.sweep import sweep_size

    options = sweep_options(args)
    pick_device(options.device)  # a bad or absent device: one line before anything runs
    if args.recall_only and args.recall_num == 0:
        from ..eval.sweep import SweepInputError

        raise SweepInputError("--recall-only with --recall-num 0 leaves nothing to run")
    torch.set_num_threads(args.threads or 1)
    total = sweep_size(options)
    payload: dict[str, Any] = {"arguments": vars(args), "status": "partial", "threads": torch.get_num_threads()}
    count = iter(range(1, total + 1))
    bars: list = []  # made at the first config: inputs are checked (one-line errors) before

    def started(label: str) -> None:
        if args.quiet:
            return
        if not bars:
            bars.append(tqdm(total=total, desc="sweep", unit="config", file=sys.stderr))
        bars[0].write(f"config {next(count)} of {total}: {label}", file=sys.stderr)

    def finished() -> None:
        if bars:
            bars[0].update(1)
        if args.json:
            write_json(args.json, payload)

    try:
        sweep(options, payload, started=started, finished=finished)
        payload["status"] = "complete"
    except KeyboardInterrupt:
        payload["status"] = "interrupted"
    finally:
        for bar in bars:
            bar.close()
    print(format_table(*summary_table(payload)))
    if args.json:
        write_json(args.json, payload)
        info(args, f"wrote {args.json}")
    if payload["status"] == "interrupted":
        done = len(payload.get("records", [])) + len(payload.get("long_stream", [])) + sum(
            len(r["results"]) for r in payload.get("recall", []))
        print(f"gsq-hf sweep: interrupted after {done} of {total} configs"
              + (f"; {args.json} holds the finished ones" if args.json else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILURE if any(r.get("error") for r in payload["records"] + payload["long_stream"]) else 0


def summary_table(payload: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per model x dataset x config: perplexity, Δ (± its paired standard error over the windows) and KL
    vs fp32, LAMBADA accuracy, stored bits."""
    def number(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    rows = [[r["model"], r["dataset"], r["config"], r["family"],
             "FAILED" if r.get("error") else number(r["perplexity"], ".4f"),
             number(r.get("delta_vs_fp32") and 100 * r["delta_vs_fp32"], "+.3f"),
             number(r.get("delta_stderr") and 100 * r["delta_stderr"], ".3f"),
             number(r.get("kl_divergence"), ".2e"), number(r.get("lambada_accuracy"), ".4f"),
             number(r.get("avg_state_bits"), ".2f"), r.get("evaluation", "-")] for r in payload.get("records", [])]
    return ["model", "dataset", "config", "family", "perplexity", "Δ %", "± SE", "KL", "LAMBADA acc", "avg bits",
            "evaluation"], rows
