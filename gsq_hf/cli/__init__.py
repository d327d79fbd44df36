"""The ``gsq-hf`` command: ``gsq-hf eval`` (decode-faithful perplexity), ``gsq-hf memory`` (peak memory),
``gsq-hf recall`` (decode-faithful associative recall of a model trained by ``scripts/train_recall.py``),
``gsq-hf sweep`` (the config grid over models, datasets, LAMBADA, long streams and recall, with the
beats-uniform verdicts: what ``scripts/results.py`` reports) and ``gsq-hf lm-eval``. One module per command.

Exit codes: 0 success; 2 bad input (unknown model, dataset or config, empty text, a context longer than
the text): one line on stderr naming what was wrong and what is accepted, no traceback unless
``--debug``; 1 any other failure, including a config whose logits went non-finite (its row says FAILED,
the other configs still run); 130 interrupted (Ctrl-C): the table of the configs that finished, the ``--json``
file with them (``"status": "interrupted"``), one line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from ..errors import GSQConfigError, UnsupportedModelError
from .common import (
    DEFAULT_CONFIGS,
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    BadInput,
    Parser,
    one_line,
    package_version,
)
from .evaluate import add_eval_parser, run_eval
from .memory import add_memory_parser, run_memory
from .recall import add_recall_parser, run_recall
from .sweep import add_sweep_parser, run_sweep

__all__ = ["DEFAULT_CONFIGS", "EXIT_BAD_INPUT", "EXIT_FAILURE", "EXIT_INTERRUPTED", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gsq-hf", description="Gated state quantization for Mamba-family models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{eval,memory,recall,sweep,lm-eval}",
                                     parser_class=Parser)
    add_eval_parser(commands)
    add_memory_parser(commands)
    add_recall_parser(commands)
    add_sweep_parser(commands)
    commands.add_parser("lm-eval", help="lm-evaluation-harness's command line with model 'gsq' registered "
                                        "(--model gsq --model_args pretrained=PATH,gsq_config=int4 ...)",
                        add_help=False)  # its arguments are lm-eval's: main() hands them over before parsing
    return parser


def _quiet_libraries(progress: bool) -> None:
    """Library logs (kernel fallbacks, Hub retries) would bury the table and the one-line errors."""
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    for name in ("huggingface_hub", "datasets", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not progress:
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gsq-hf``; returns the exit code."""
    from ..eval.data import EvalInputError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval's own command line and exit codes
        from ..eval.lm_eval import cli_main

        return cli_main(argv[1:])
    try:
        args = _parser().parse_args(argv)
    except SystemExit as done:  # --help, or a usage error already printed as one line
        return done.code if isinstance(done.code, int) else EXIT_BAD_INPUT
    if not args.debug:
        _quiet_libraries(progress=not args.quiet)
    run = {"eval": run_eval, "memory": run_memory, "recall": run_recall, "sweep": run_sweep}[args.command]
    try:
        return run(args)
    except BrokenPipeError:  # the reader of stdout left (gsq-hf eval | head): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return EXIT_FAILURE
    except KeyboardInterrupt:  # outside a sweep (loading, the reference, plots); a sweep keeps its results
        print(f"gsq-hf {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (BadInput, EvalInputError, GSQConfigError, UnsupportedModelError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"gsq-hf {args.command}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:  # any other failure: still one line and a non-zero exit
        if args.debug:
            raise
        print(f"gsq-hf {args.command}: error: {type(error).__name__}: {one_line(error)} (rerun with --debug for "
              "the traceback)", file=sys.stderr)
        return EXIT_FAILURE

