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
    registered; returns the exit code. Without lm-eval: one line on stderr and exit code 2."""
    if not HAS_LM_EVAL:
        print(f"gsq-hf lm-eval: error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *(saved[1:] if argv is None else argv)]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else int(done.code is not None)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
