"""The ``gsq-hf`` command: ``gsq-hf eval`` (decode-faithful perplexity), ``gsq-hf memory`` (peak memory) and
``gsq-hf recall`` (decode-faithful associative recall of a model trained by ``scripts/train_recall.py``).

Exit codes: 0 success; 2 bad input (unknown model, dataset or config, empty text, a context longer than
the text): one line on stderr naming what was wrong and what is accepted, no traceback unless
``--debug``; 1 any other failure, including a config whose logits went non-finite (its row says FAILED,
the other configs still run); 130 interrupted (Ctrl-C): the table of the configs that finished, the ``--json``
file with them (``"status": "interrupted"``), one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import Any, NoReturn

from .config import GSQConfig, list_presets, resolve_config
from .errors import GSQConfigError, UnsupportedModelError

__all__ = ["main"]

DEFAULT_CONFIGS = ("fp32", "int8", "int4", "gsq-gate", "gsq-entropy", "gsq-budget")
EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
THREADS_HELP = ("intra-op CPU threads (torch.set_num_threads; default: 1 for models under 200M parameters, whose "
                "per-token ops are too small to share and slow down many-fold when other jobs use the cores; else "
                "min(available cores, 4))")


class BadInput(Exception):
    """A command-line value that cannot work; the message is the whole error line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line too (same format and exit code 2 as every bad input)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory saved by save_pretrained, or a HuggingFace Hub model id "
                                        "(default: the built-in tiny Mamba trained on the pydoc topics)")
    parser.add_argument("--dataset", help="'builtin' (default: the stdlib's pydoc topics), a .txt/.raw file, a "
                                          ".jsonl file with a 'text' field, a directory of .txt/.raw files, or a "
                                          "Hub dataset 'name' or 'name:config' (loaded with datasets.load_dataset)")
    parser.add_argument("--split", default="test", help="dataset split (default: test); for a directory, files "
                                                        "whose name has the split as a part, e.g. wiki.test.raw")
    parser.add_argument("--config", action="extend", nargs="+", metavar="CONFIG",
                        help="state config: a preset (" + ", ".join(list_presets()) + ") or a YAML/JSON file; "
                             "repeatable (default: " + " ".join(DEFAULT_CONFIGS) + ")")
    parser.add_argument("--batch-size", type=_positive, default=8, help="sequences run at once (default: 8)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="model weights and activations dtype (default: fp32)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--load-in-8bit", dest="quantization", action="store_const", const="8bit",
                         help="load the linear layers' weights in int8 with bitsandbytes (LLM.int8; the LM head "
                              "stays unquantized); needs pip install 'gsq_hf[bnb]'")
    weights.add_argument("--load-in-4bit", dest="quantization", action="store_const", const="4bit",
                         help="load the linear layers' weights in 4-bit NF4 with bitsandbytes (computing in --dtype)")
    parser.add_argument("--device-map", choices=("auto", "balanced", "balanced_low_0", "sequential"),
                        help="let accelerate place the layers instead of --device (over several GPUs, offloading "
                             "what does not fit to the CPU)")
    parser.add_argument("--seed", type=int, help="seed of torch and, when given, of every config's stochastic "
                                                 "rounding (default: torch seed 0, configs keep their own)")
    _run_options(parser)


def _run_options(parser: argparse.ArgumentParser) -> None:
    """Threads, JSON output, verbosity: the same for every command."""
    parser.add_argument("--threads", type=_positive, metavar="N", help=THREADS_HELP)
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON, after every config "
                                                      "(a crash or Ctrl-C keeps the finished ones)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or run information, only the table")
    parser.add_argument("--debug", action="store_true", help="show library logs and full tracebacks")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gsq_hf")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return __version__


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gsq-hf", description="Gated state quantization for Mamba-family models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{eval,memory,recall,lm-eval}",
                                     parser_class=_Parser)
    evaluate = commands.add_parser(
        "eval", help="decode-faithful perplexity of each state config",
        description="Perplexity with the model's states stored per each config after every token, as generate "
                    "stores them: static, gate and budget configs through multi-token forwards whose scan stores "
                    "after every token, entropy configs (and --stepped) one token per forward. Windows of "
                    "--context tokens do not overlap; the first token of each is read, the others scored.")
    _common(evaluate)
    evaluate.add_argument("--context", type=_positive, default=512, help="tokens per window (default: 512)")
    evaluate.add_argument("--max-tokens", type=_positive, help="evaluate only the first N tokens (default: all)")
    evaluate.add_argument("--no-reference", action="store_true",
                          help="skip the unpatched full-sequence reference perplexity")
    evaluate.add_argument("--stepped", action="store_true",
                          help="feed every config one token per forward (default: only where a multi-token "
                               "forward would store other states: entropy policies, end_of_forward)")
    evaluate.add_argument("--kl-top-k", type=int, default=64, metavar="K",
                          help="score every config after the first by KL(first ‖ config) per token and top-1 "
                               "agreement, over the first config's top K next-token logits and one bin for the "
                               "rest (a lower bound of the full KL; default: 64; 0: off)")
    evaluate.add_argument("--plot", metavar="DIR",
                          help="save pareto.png (perplexity vs average stored state bits, per config) and, for "
                               "each dynamic policy, trace-CONFIG.png (its precision per layer and token over "
                               "the first batch of windows) in DIR (needs matplotlib)")
    memory = commands.add_parser(
        "memory", help="peak memory of a real generate per config, patched vs unpatched",
        description="Runs generate once per config (and unpatched), each in a fresh process, and reports the "
                    "peak resident memory (and peak CUDA memory on a GPU) and the state bytes per sequence.")
    _common(memory)
    memory.add_argument("--new-tokens", type=_positive, default=128, help="tokens generated (default: 128)")
    memory.add_argument("--prompt-tokens", type=_positive, default=32,
                        help="prompt length, taken from the start of the dataset text (default: 32)")
    _recall_parser(commands)
    commands.add_parser("lm-eval", help="lm-evaluation-harness's command line with model 'gsq' registered "
                                        "(--model gsq --model_args pretrained=PATH,gsq_config=int4 ...)",
                        add_help=False)  # its arguments are lm-eval's: main() hands them over before parsing
    return parser


def _recall_parser(commands) -> None:
    recall = commands.add_parser(
        "recall", help="decode-faithful associative recall (MQAR) of each state config",
        description="Multi-query associative recall with the model's states stored per each config: every "
                    "sequence (key-value pairs, GAP filler tokens, queries) runs with its states stored after "
                    "every token, as generate stores them, and a query counts when the argmax next token is its "
                    "value. The task is read from the model directory's recall_model.json (scripts/"
                    "train_recall.py writes it).")
    recall.add_argument("--model", required=True, help="directory of a recall model (save_pretrained + "
                                                       "recall_model.json, from scripts/train_recall.py)")
    recall.add_argument("--config", action="extend", nargs="+", metavar="CONFIG",
                        help="state config: a preset (" + ", ".join(list_presets()) + ") or a YAML/JSON file; "
                             "repeatable (default: " + " ".join(DEFAULT_CONFIGS) + ")")
    recall.add_argument("--gap", type=_int_list, metavar="G[,G...]",
                        help="filler tokens between the pairs and the queries, comma-separated "
                             "(default: the training gap and 4x it)")
    recall.add_argument("--num", type=_positive, default=512, help="sequences per gap (default: 512)")
    recall.add_argument("--pairs", type=int, help="key-value pairs per sequence (default: the training task's)")
    recall.add_argument("--queries", type=int, help="queries per sequence (default: the training task's, at most "
                                                    "--pairs)")
    recall.add_argument("--batch-size", type=_positive, default=128, help="sequences run at once (default: 128)")
    recall.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, ... (default: cuda if available)")
    recall.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="model weights and activations dtype (default: fp32)")
    recall.add_argument("--seed", type=int, help="seed of the sequences (default: 0, the set train_recall.py "
                                                 "reports) and, when given, of every config's stochastic rounding")
    _run_options(recall)


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,128,512, got {text!r}") \
            from None


# -- shared steps ---------------------------------------------------------------------------------------
def _configs(names: Sequence[str] | None, seed: int | None) -> list[GSQConfig]:
    configs = [resolve_config(name) for name in (names or DEFAULT_CONFIGS)]
    return configs if seed is None else [dataclasses.replace(cfg, seed=seed) for cfg in configs]


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BadInput(f"device {name!r} is not a torch device; accepted: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device {name!r} asked for CUDA, but torch sees no CUDA device; use --device cpu")
    return name


def _model_source(model: str | None) -> str:
    if model is not None:
        return model
    try:
        from .eval.builtin import BUILTIN_MODEL_DIR
    except ImportError:
        raise BadInput("no --model given and gsq_hf has no built-in model; pass --model DIR_OR_HUB_ID") from None
    if not BUILTIN_MODEL_DIR.is_dir():
        raise BadInput(f"no --model given and the built-in model is missing at {BUILTIN_MODEL_DIR}; "
                       "pass --model DIR_OR_HUB_ID")
    return str(BUILTIN_MODEL_DIR)


def _check_configs(model, configs: list[GSQConfig], ids) -> None:
    """Patch, step two tokens of ``ids`` and unpatch, per config.

    A config the model cannot take fails before any long run starts, and first-call costs (lazy kernel
    setup, allocator growth) stay out of the timed runs.
    """
    import torch

    from .cache import GSQCache
    from .eval.perplexity import _device as input_device
    from .patch import patched

    for cfg in configs:
        with patched(model, cfg), torch.inference_mode():
            cache = GSQCache(model, cfg)
            for t in range(2):
                model(input_ids=ids[:1, t : t + 1].to(input_device(model)), cache=cache, use_cache=True)


def _set_threads(args: argparse.Namespace, model) -> int:
    import torch

    from .eval.data import default_threads

    threads = args.threads or default_threads(model)
    torch.set_num_threads(threads)
    return threads


def _info(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _sweep(args: argparse.Namespace, configs: list[GSQConfig], run, payload: dict[str, Any], write: bool) -> bool:
    """``run(i, config)`` for each config in turn, saying which on stderr ("config 3 of 6: int4") and, with
    ``--json``, writing ``payload`` after each (``"status": "partial"`` until the caller finishes it), so a
    crash or Ctrl-C keeps the finished configs. False when Ctrl-C stopped it (the payload then says so)."""
    from .eval.report import write_json

    payload["status"] = "partial"
    try:
        for i, cfg in enumerate(configs):
            _info(args, f"config {i + 1} of {len(configs)}: {cfg.name}")
            run(i, cfg)
            if write and args.json:
                write_json(args.json, payload)
    except KeyboardInterrupt:
        payload["status"] = "interrupted"
        return False
    return True


def _interrupted(args: argparse.Namespace, payload: dict[str, Any], table: str) -> int:
    """Ctrl-C during a sweep: the table and the JSON of what finished, one line on stderr, exit 130."""
    from .eval.report import write_json

    print(table)
    if args.json:
        write_json(args.json, payload)
    done, total = len(payload["results"]), len(payload["configs"])
    print(f"gsq-hf {args.command}: interrupted after {done} of {total} configs"
          + (f"; {args.json} holds the finished ones" if args.json else ""), file=sys.stderr)
    return EXIT_INTERRUPTED


def _header(args: argparse.Namespace, model: str) -> dict[str, Any]:
    from .eval.report import versions

    return {"model": model, "dataset": args.dataset or "builtin", "split": args.split, "versions": versions()}


# -- commands -------------------------------------------------------------------------------------------
def _run_eval(args: argparse.Namespace) -> int:
    import torch

    from .cache import weight_bytes
    from .eval.data import load_model, load_text, load_tokenizer, make_windows
    from .eval.distributed import Processes
    from .eval.perplexity import (
        NonFiniteLogitsError,
        decode_faithful_perplexity,
        full_sequence_perplexity,
        reference_options,
    )
    from .eval.report import add_deltas, eval_table, failed_record, weights_line, write_json

    configs = _configs(args.config, args.seed)
    processes = Processes(_device(args.device))  # one, unless started by torchrun / accelerate launch
    device, main = processes.device, processes.is_main
    if processes.count > 1 and args.device_map is not None:
        raise BadInput("--device-map spreads one model over devices; with several processes each process "
                       "evaluates on its own device: drop --device-map or launch one process")
    args.quiet = args.quiet or not main  # progress and run information from the main process only
    source = _model_source(args.model)
    if args.plot:
        _require_matplotlib()
    if args.kl_top_k < 0:
        raise BadInput(f"--kl-top-k must be 0 (off) or a positive number of logits, got {args.kl_top_k}")
    torch.manual_seed(0 if args.seed is None else args.seed)
    text = load_text(args.dataset, args.split)
    windows = make_windows(load_tokenizer(source), text, args.context, args.max_tokens)
    model = load_model(source, args.dtype, device, quantization=args.quantization, device_map=args.device_map)
    threads = _set_threads(args, model)
    _check_configs(model, configs, windows.ids)
    shard = processes.shard(windows, args.batch_size)  # whole batches of windows, contiguous
    _info(args, f"model {source} ({args.dtype}, {device}, {threads} thread{'s' * (threads > 1)}); dataset "
                f"{args.dataset or 'builtin'}:{args.split}; {windows.ids.shape[0]} windows x {windows.context} "
                f"tokens, {windows.scored_tokens} scored" + (f"; {processes.count} processes" if processes.count > 1
                                                            else ""))
    progress = not args.quiet

    traces: dict[str, dict[str, Any]] = {}
    kept: dict[str, Any] = {}  # the first config's top-k logits, this process's windows

    def attempt(label: str, evaluate, *config: GSQConfig, **options) -> dict[str, Any]:
        """The run's record, or an error record: one config's non-finite logits do not stop the others."""
        result, failure = None, None
        try:
            if shard.ids.shape[0]:  # a process can be left without a batch
                result = evaluate(model, shard, *config, batch_size=args.batch_size, progress=progress, **options)
        except NonFiniteLogitsError as error:
            failure = str(error)
        result, failure = processes.combine(result, failure)  # gathered over processes (no-op for one)
        if failure is not None:
            return failed_record(label, windows.scored_tokens, failure)
        if getattr(result, "trace", None) is not None:
            traces[label] = result.trace
        if getattr(result, "reference", None) is not None:
            kept["reference"] = result.reference
        return result.to_dict()

    weights = weight_bytes(model)
    records: list[dict[str, Any]] = []
    payload = {**_header(args, source), "context": windows.context, "windows": windows.ids.shape[0],
               "batch_size": args.batch_size, "max_tokens": args.max_tokens, "device": device, "dtype": args.dtype,
               "quantization": args.quantization, "device_map": args.device_map, "processes": processes.count,
               "threads": threads, "weight_bytes": weights, "kl_top_k": args.kl_top_k,
               "scoring": "non-overlapping windows; token 0 of each window read, tokens 1..context-1 scored",
               "configs": [cfg.name for cfg in configs], "results": records}

    def run(i: int, cfg: GSQConfig) -> None:
        record = attempt(cfg.name, decode_faithful_perplexity, cfg, stepped=True if args.stepped else None,
                         **reference_options(model, i == 0, kept.get("reference"), args.kl_top_k),
                         **({"trace": True} if args.plot and cfg.build_policy().high is not None else {}))
        state = record.get("state_bytes")  # what one batch needs in all: the weights plus its sequences' state
        record["weight_bytes"] = weights
        record["weights_plus_batch_state_bytes"] = None if state is None else weights + args.batch_size * state
        records.append(record)
        add_deltas(records)

    finished = _sweep(args, configs, run, payload, write=main)
    table = eval_table(records, args.kl_top_k or None)
    if not finished:
        processes.close()
        return _interrupted(args, payload, table) if main else EXIT_INTERRUPTED
    if main:
        print(table)
    if not args.no_reference:
        try:
            reference = attempt("reference", full_sequence_perplexity)
            records = [*records, reference]
        except RuntimeError as error:  # transformers' Mamba-1 forward multiplies by dt_proj.weight directly
            if args.quantization is None:
                raise
            reference = failed_record("reference", windows.scored_tokens, "not available: the unpatched model "
                                      f"cannot run {args.quantization} bitsandbytes weights ({_one_line(error)})")
        payload["reference"] = reference
        value = "FAILED (" + reference["error"] + ")" if "error" in reference else f"{reference['perplexity']:.4f}"
        if main:
            print(f"reference (unpatched model, one full-sequence forward per window): ppl {value}")
    if main:
        print(weights_line(payload["results"], weights, args.batch_size, args.quantization or args.dtype))
    processes.close()
    if not main:
        return EXIT_FAILURE if any(r.get("error") for r in records) else 0
    payload["status"] = "complete"
    if args.json:
        write_json(args.json, payload)
        _info(args, f"wrote {args.json}")
    if args.plot:
        for path in _save_plots(args.plot, payload, traces):
            _info(args, f"wrote {path}")
    return EXIT_FAILURE if any(r.get("error") for r in records) else 0


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BadInput('--plot needs matplotlib; pip install "gsq_hf[plot]"') from None


def _save_plots(directory: str, payload: dict[str, Any], traces: dict[str, dict[str, Any]]) -> list:
    """``pareto.png`` and one ``trace-<config>.png`` per traced config in ``directory``; the paths written."""
    import re
    from pathlib import Path

    from . import plot

    directory = Path(directory)
    where = f"{Path(payload['model']).name} on {payload['dataset']}:{payload['split']}, context {payload['context']}"
    figures = {"pareto.png": plot.pareto(payload, title=f"state bits vs perplexity — {where}")}
    for name, trace in traces.items():
        file = "trace-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png"
        rows = trace["high_fraction"].shape[2]
        figures[file] = plot.precision_trace(trace, title=f"{name} — precision trace, mean over the first {rows} "
                                                          "windows")
    paths = []
    for file, figure in figures.items():
        plot.save(figure, directory / file)
        paths.append(directory / file)
    return paths


def _run_memory(args: argparse.Namespace) -> int:
    from .eval.data import load_text, load_tokenizer, make_windows
    from .eval.memory import measure_configs
    from .eval.report import memory_table, peak_resolution, write_json

    configs = _configs(args.config, args.seed)
    device = _device(args.device)
    source = _model_source(args.model)
    text = load_text(args.dataset, args.split)
    prompt = make_windows(load_tokenizer(source), text, args.prompt_tokens, args.prompt_tokens).ids[0].tolist()
    _info(args, f"model {source} ({args.dtype}, {device}); batch {args.batch_size}, {args.prompt_tokens} prompt + "
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
        payload = {**_header(args, source), "batch_size": args.batch_size, "prompt_tokens": args.prompt_tokens,
                   "new_tokens": args.new_tokens, "device": device, "dtype": args.dtype,
                   "quantization": args.quantization, "device_map": args.device_map, "threads": args.threads,
                   "resolution_bytes": {key: peak_resolution(records, key)
                                        for key in ("peak_rss_bytes", "peak_cuda_bytes")},
                   "results": records}
        write_json(args.json, payload)
        _info(args, f"wrote {args.json}")
    checked = [r for r in records[1:] if not r.get("repeat")] if baseline_may_fail else records
    return EXIT_FAILURE if any(r.get("error") for r in checked) else 0


def _run_recall(args: argparse.Namespace) -> int:
    from .eval.data import load_model
    from .eval.recall import (
        add_recall_deltas,
        check_recall_task,
        generate_mqar,
        load_recall_spec,
        read_recall_info,
        recall_sweep,
        recall_table,
    )
    from .eval.report import versions, write_json

    configs = _configs(args.config, args.seed)
    device = _device(args.device)
    spec = load_recall_spec(args.model, pairs=args.pairs, queries=args.queries)
    gaps = args.gap or [spec.gap, 4 * spec.gap]
    model = load_model(args.model, args.dtype, device)
    threads = _set_threads(args, model)
    seed = 0 if args.seed is None else args.seed
    _info(args, f"model {args.model} ({args.dtype}, {device}, {threads} thread{'s' * (threads > 1)}); "
                f"{spec.pairs} pairs, {spec.queries} queries, {spec.keys} keys, {spec.values} values; gaps "
                f"{','.join(map(str, gaps))}; {args.num} sequences per gap (seed {seed})")
    check_recall_task(model, spec, gaps, args.num)  # before any config runs
    _check_configs(model, configs, generate_mqar(spec, 1, seed=seed).input_ids)
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

    if not _sweep(args, configs, run, payload, write=True):
        return _interrupted(args, payload, recall_table(records))
    print(recall_table(records))
    payload["status"] = "complete"
    if args.json:
        write_json(args.json, payload)
        _info(args, f"wrote {args.json}")
    return 0


def _quiet_libraries(progress: bool) -> None:
    """Library logs (kernel fallbacks, Hub retries) would bury the table and the one-line errors."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    for name in ("huggingface_hub", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not progress:
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gsq-hf``; returns the exit code."""
    from .eval.data import EvalInputError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval's own command line and exit codes
        from .eval.lm_eval import cli_main

        return cli_main(argv[1:])
    try:
        args = _parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed as one line
        return done.code if isinstance(done.code, int) else EXIT_BAD_INPUT
    if not args.debug:
        _quiet_libraries(progress=not args.quiet)
    run = {"eval": _run_eval, "memory": _run_memory, "recall": _run_recall}[args.command]
    try:
        return run(args)
    except KeyboardInterrupt:  # outside a sweep (loading, the reference, plots); a sweep keeps its results
        print(f"gsq-hf {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (BadInput, EvalInputError, GSQConfigError, UnsupportedModelError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"gsq-hf {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:  # any other failure: still one line and a non-zero exit
        if args.debug:
            raise
        print(f"gsq-hf {args.command}: error: {type(error).__name__}: {_one_line(error)} (rerun with --debug for "
              "the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
