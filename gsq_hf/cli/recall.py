"""``gsq-hf recall``: decode-faithful associative recall (MQAR) of each state config."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import GSQConfig
from .common import (
    CONFIG_HELP,
    check_configs,
    info,
    int_list,
    interrupted,
    pick_device,
    positive,
    recall_model,
    resolve_configs,
    run_configs,
    run_options,
    set_threads,
)


def add_recall_parser(commands) -> None:
    recall = commands.add_parser(
        "recall", help="decode-faithful associative recall (MQAR) of each state config",
        description="Multi-query associative recall with the model's states stored per each config: every "
                    "sequence (key-value pairs, GAP filler tokens, queries) runs with its states stored after "
                    "every token, as generate stores them, and a query counts when the argmax next token is its "
                    "value. The task is read from the model directory's recall_model.json (scripts/"
                    "train_recall.py writes it).")
    recall.add_argument("--model", type=recall_model, default="recall-mamba2",
                        help="directory of a recall model (save_pretrained + recall_model.json, from "
                             "scripts/train_recall.py), or recall-mamba / recall-mamba2, the two that ship with the "
                             "package (default: recall-mamba2)")
    recall.add_argument("--config", action="extend", nargs="+", metavar="CONFIG", help=CONFIG_HELP)
    recall.add_argument("--gap", type=int_list, metavar="G[,G...]",
                        help="filler tokens between the pairs and the queries, comma-separated "
                             "(default: the training gap and 4x it)")
    recall.add_argument("--num", type=positive, default=512, help="sequences per gap (default: 512)")
    recall.add_argument("--pairs", type=int, help="key-value pairs per sequence (default: the training task's)")
    recall.add_argument("--queries", type=int, help="queries per sequence (default: the training task's, at most "
                                                    "--pairs)")
    recall.add_argument("--batch-size", type=positive, default=128, help="sequences run at once (default: 128)")
    recall.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, ... (default: cuda if available)")
    recall.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="model weights and activations dtype (default: fp32)")
    recall.add_argument("--seed", type=int, help="seed of the sequences (default: 0, the set train_recall.py "
                                                 "reports) and, when given, of every config's stochastic or "
                                                 "quasi-random rounding")
    run_options(recall)



def run_recall(args: argparse.Namespace) -> int:
    from ..eval.data import load_model
    from ..eval.recall import (
        add_recall_deltas,
        check_recall_task,
        generate_mqar,
        load_recall_spec,
        read_recall_info,
        recall_sweep,
        recall_table,
    )
    from ..eval.report import versions, write_json

    configs = resolve_configs(args.config, args.seed)
    device = pick_device(args.device)
    spec = load_recall_spec(args.model, pairs=args.pairs, queries=args.queries)
    gaps = args.gap or [spec.gap, 4 * spec.gap]
    model = load_model(args.model, args.dtype, device)
    threads = set_threads(args, model)
    seed = 0 if args.seed is None else args.seed
    info(args, f"model {args.model} ({args.dtype}, {device}, {threads} thread{'s' * (threads > 1)}); "
                f"{spec.pairs} pairs, {spec.queries} queries, {spec.keys} keys, {spec.values} values; gaps "
                f"{','.join(map(str, gaps))}; {args.num} sequences per gap (seed {seed})")
    check_recall_task(model, spec, gaps, args.num)  # before any config runs
    check_configs(model, configs, generate_mqar(spec, 1, seed=seed).input_ids)
    trained = read_recall_info(args.model)
    records: list[dict[str, Any]] = []
    payload = {"model": args.model, "device": device, "dtype": args.dtype, "batch_size": args.batch_size,
               "threads": threads, "versions": versions(),
               "trained": {key: trained.get(key) for key in ("family", "parameters", "recall_fp32", "command")},
               "scoring": "every sequence through the patched model with its states stored after every token "
                          "(records' 'evaluation': chunked forwards or stepped); a query counts when the argmax "
                          "next token is its value; the same seed at every gap",
               "configs": [cfg.name for cfg in configs], "results": records}

    def run(i: int, cfg: GSQConfig) -> None:
        sweep = recall_sweep(model, spec, [cfg], gaps, args.num, seed=seed, batch_size=args.batch_size,
                             progress=not args.quiet)
        records.append(sweep.pop("results")[0])
        add_recall_deltas(records)  # one config per sweep: deltas against the run's first config
        payload.update(sweep)  # task, gaps, num, seed

    if not run_configs(args, configs, run, payload, write=True):
        return interrupted(args, payload, recall_table(records))
    print(recall_table(records))
    payload["status"] = "complete"
    if args.json:
        write_json(args.json, payload)
        info(args, f"wrote {args.json}")
    return 0

