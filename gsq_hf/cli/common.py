"""What every ``gsq-hf`` command shares: options, inputs checked into one-line errors, threads, and a run of
configs that says which runs, writes the JSON after each and keeps the finished ones on Ctrl-C."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..config import GSQConfig, list_presets, resolve_config

DEFAULT_CONFIGS = ("fp32", "int8", "int4", "gsq-4bit", "gsq-3bit", "gsq-gate", "gsq-entropy", "gsq-budget")
EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
THREADS_HELP = ("intra-op CPU threads (torch.set_num_threads; default: 1 for models under 200M parameters, whose "
                "per-token ops are too small to share and slow down many-fold when other jobs use the cores; else "
                "min(available cores, 4))")


CONFIG_HELP = ("state config: a preset (" + ", ".join(list_presets()) + "), a state format name (one format "
               "everywhere, e.g. int4-e4m3-hadamard) or a YAML/JSON file; repeatable (default: "
               + " ".join(DEFAULT_CONFIGS) + ")")


class BadInput(Exception):
    """A command-line value that cannot work; the message is the whole error line."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line too (same format and exit code 2 as every bad input)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory saved by save_pretrained, or a HuggingFace Hub model id "
                                        "(default: the built-in tiny Mamba trained on the pydoc topics)")
    parser.add_argument("--dataset", help="'builtin' (default: the stdlib's pydoc topics), a .txt/.raw file, a "
                                          ".jsonl file with a 'text' field, a directory of .txt/.raw files, or a "
                                          "Hub dataset 'name' or 'name:config' (loaded with datasets.load_dataset)")
    parser.add_argument("--split", default="test", help="dataset split (default: test); for a directory, files "
                                                        "whose name has the split as a part, e.g. wiki.test.raw")
    parser.add_argument("--config", action="extend", nargs="+", metavar="CONFIG",
                        help=CONFIG_HELP)
    parser.add_argument("--batch-size", type=positive, default=8, help="sequences run at once (default: 8)")
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
    parser.add_argument("--seed", type=int, help="seed of torch and, when given, of every config's stochastic or "
                                                 "quasi-random rounding (default: torch seed 0, configs keep "
                                                 "their own)")
    run_options(parser)


def run_options(parser: argparse.ArgumentParser) -> None:
    """Threads, JSON output, verbosity: the same for every command."""
    parser.add_argument("--threads", type=positive, metavar="N", help=THREADS_HELP)
    parser.add_argument("--json", type=json_file, metavar="FILE",
                        help="also write the results to FILE as JSON, after every config (a crash or Ctrl-C keeps "
                             "the finished ones)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars, run information or column legend: the table and its result lines")
    parser.add_argument("--debug", action="store_true", help="show library logs and full tracebacks")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gsq_hf")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from .. import __version__

        return __version__


def recall_model(text: str) -> str:
    """A recall model directory, or the name of one that ships with the package (recall-mamba, recall-mamba2)."""
    from ..eval.sweep import default_recall_models

    if not Path(text).expanduser().exists():
        shipped = {Path(d).name: d for d in default_recall_models()}
        return shipped.get(text, text)
    return text


def output_dir(text: str) -> str:
    """A folder to write into (``--plot``), checked before any config runs: absent (made) or a folder."""
    _check_folder(text, Path(text).expanduser(), "; give a folder")
    return text


def json_file(text: str) -> str:
    """A ``--json`` path that can be written, checked before any config runs (not at the first write)."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file path, e.g. {path / 'results.json'}")
    _check_folder(text, path.parent, ", so no folder can be made there")
    return text


def _check_folder(text: str, folder: Path, if_file: str) -> None:
    """``folder`` can be made and written: its nearest existing ancestor is a writable directory."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {existing} is a file{if_file}")
    if not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: {existing} is not writable")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value



def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,128,512, got {text!r}") \
            from None



def resolve_configs(names: Sequence[str] | None, seed: int | None) -> list[GSQConfig]:
    """The ``--config`` values as configs; two with one name are refused (rows and JSON records are keyed by it)."""
    names = list(names or DEFAULT_CONFIGS)
    configs = [resolve_config(name) for name in names]
    sources: dict[str, list[str]] = {}
    for name, config in zip(names, configs, strict=True):
        sources.setdefault(config.name, []).append(name)
    clashes = {label: given for label, given in sources.items() if len(given) > 1}
    if clashes:
        label, given = next(iter(clashes.items()))
        raise BadInput(f"--config {' and '.join(given)} are both named {label!r}, and results are keyed by name; "
                       "list each config once, or give each file its own `name:` (or file name)")
    return configs if seed is None else [dataclasses.replace(cfg, seed=seed) for cfg in configs]


def pick_device(name: str) -> str:
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


def model_source(model: str | None) -> str:
    if model is not None:
        return model
    try:
        from ..eval.builtin import BUILTIN_MODEL_DIR
    except ImportError:
        raise BadInput("no --model given and gsq_hf has no built-in model; pass --model DIR_OR_HUB_ID") from None
    if not BUILTIN_MODEL_DIR.is_dir():
        raise BadInput(f"no --model given and the built-in model is missing at {BUILTIN_MODEL_DIR}; "
                       "pass --model DIR_OR_HUB_ID")
    return str(BUILTIN_MODEL_DIR)


def check_configs(model, configs: list[GSQConfig], ids) -> None:
    """Patch, step two tokens of ``ids`` and unpatch, per config.

    A config the model cannot take fails before any long run starts, and first-call costs (lazy kernel
    setup, allocator growth) stay out of the timed runs.
    """
    import torch

    from ..cache import GSQCache
    from ..eval.perplexity import _device as input_device
    from ..eval.stepping import next_token_logits
    from ..patch import patched

    for cfg in configs:
        with patched(model, cfg), torch.inference_mode():
            for _ in next_token_logits(model, ids[:1, :2].to(input_device(model)), GSQCache(model, cfg), stepped=True):
                pass


def set_threads(args: argparse.Namespace, model) -> int:
    import torch

    from ..eval.data import default_threads

    threads = args.threads or default_threads(model)
    torch.set_num_threads(threads)
    return threads


def info(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def run_configs(args: argparse.Namespace, configs: list[GSQConfig], run, payload: dict[str, Any], write: bool) -> bool:
    """``run(i, config)`` for each config in turn, saying which on stderr ("config 3 of 6: int4") and, with
    ``--json``, writing ``payload`` after each (``"status": "partial"`` until the caller finishes it), so a
    crash or Ctrl-C keeps the finished configs. False when Ctrl-C stopped it (the payload then says so)."""
    from ..eval.report import write_json

    payload["status"] = "partial"
    try:
        for i, cfg in enumerate(configs):
            info(args, f"config {i + 1} of {len(configs)}: {cfg.name}")
            run(i, cfg)
            if write and args.json:
                write_json(args.json, payload)
    except KeyboardInterrupt:
        payload["status"] = "interrupted"
        return False
    return True


def interrupted(args: argparse.Namespace, payload: dict[str, Any], table: str) -> int:
    """Ctrl-C during a sweep: the table and the JSON of what finished, one line on stderr, exit 130."""
    from ..eval.report import write_json

    print(table)
    if args.json:
        write_json(args.json, payload)
    done, total = len(payload["results"]), len(payload["configs"])
    print(f"gsq-hf {args.command}: interrupted after {done} of {total} configs"
          + (f"; {args.json} holds the finished ones" if args.json else ""), file=sys.stderr)
    return EXIT_INTERRUPTED


def header(args: argparse.Namespace, model: str) -> dict[str, Any]:
    from ..eval.report import versions

    return {"model": model, "dataset": args.dataset or "builtin", "split": args.split, "versions": versions()}


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def run_script(main: Callable[[], Any]) -> None:
    """A ``scripts/`` entry point: bad input (a missing model, dataset or file, a wrong config) is one line on
    stderr and exit code 2, as in ``gsq-hf``; any other failure keeps its traceback (a bug to see whole)."""
    from ..errors import GSQConfigError, UnsupportedModelError
    from ..eval.data import EvalInputError

    try:
        main()
    except (EvalInputError, GSQConfigError, UnsupportedModelError, FileNotFoundError, IsADirectoryError,
            NotADirectoryError) as error:
        print(f"{Path(sys.argv[0]).name}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)

