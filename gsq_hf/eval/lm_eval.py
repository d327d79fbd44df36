"""lm-evaluation-harness on a patched model: model ``gsq`` (`GSQLM`, an `HFLM` subclass).

lm-eval 0.4.13 finds models only in its registry (no plugin entry points), so importing this module is what
registers ``gsq``. From Python::

    import gsq_hf.eval.lm_eval  # noqa: F401  (registers "gsq")
    lm_eval.simple_evaluate(model="gsq", model_args="pretrained=PATH,gsq_config=int4,device=cpu", tasks=[...])

From the shell, lm-eval's own CLI with ``gsq`` registered: ``gsq-hf lm-eval --model gsq --model_args
pretrained=PATH,gsq_config=int4 --tasks wikitext`` (or ``python -m gsq_hf.eval.lm_eval ...``).

``gsq_config`` is a preset name or a YAML/JSON path. Entropy-policy (and ``end_of_forward``) configs are
scored token by token (decode-faithful); the others by lm-eval's usual multi-token forward, which with the
default ``every_step`` stores the quantized state after every token already (`GSQLM`). Generative tasks
run the patched model's ``generate`` (a prefill forward, then one token per step), as a user's generation does.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

__all__ = ["GSQLM", "HAS_LM_EVAL", "INSTALL_HINT", "cli_main"]

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'gsq_hf[lmeval]'"

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
if HAS_LM_EVAL:  # registers "gsq"; without lm-eval this module still imports, and cli_main says what to install
    from ._harness import GSQLM


def cli_main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's command line (``lm-eval run ...`` arguments; default ``sys.argv[1:]``) with ``gsq``
    registered; returns the exit code. Without lm-eval: one line on stderr and exit code 2. A failure inside
    lm-eval (an unreachable dataset, say) is one line and exit code 1, as in the other commands; ``--debug``
    (ours: lm-eval has no such flag) lets its traceback through."""
    if not HAS_LM_EVAL:
        print(f"gsq-hf lm-eval: error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    arguments = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in arguments
    if {"-h", "--help"} & set(arguments) or not arguments:  # lm-eval's help speaks of its own models only
        print("gsq-hf lm-eval: lm-evaluation-harness's command line with the model 'gsq' registered: a patched "
              "Mamba-family model,\n  e.g. run --model gsq --model_args pretrained=DIR,gsq_config=int4 --tasks "
              "wikitext (gsq_config: a preset, a format name\n  or a YAML path; --debug: tracebacks). lm-eval's own "
              "help follows.\n")
    saved = sys.argv
    sys.argv = ["lm-eval", *(a for a in arguments if a != "--debug")]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    except Exception as error:
        if debug:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"gsq-hf lm-eval: error: {type(error).__name__}: {reason} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
