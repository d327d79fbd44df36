"""Where a model can come from: a local directory saved by ``save_pretrained``, or a Hub id.

File-system checks only, made before transformers reads anything (used by `gsq_hf.from_pretrained` and the
evaluation loaders): transformers reports a missing local path through its Hub-id validator ("Repo id must
be in the form ...") and a directory without config.json through whichever tokenizer it falls back to.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["ACCEPTED_MODELS", "HUB_ID", "model_path_problem"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # ./x, /x, ~/x, a/b/c, x/ cannot be Hub ids
ACCEPTED_MODELS = ("a local directory saved by save_pretrained (config.json, weights, tokenizer) or a Hub model id "
                   "like 'state-spaces/mamba-130m-hf'")


def model_path_problem(source: str | Path) -> str | None:
    """Why ``source`` can be neither a saved model directory nor a Hub id, or None when it can be one."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return None
        return (f"could not load model {text!r}: the directory has no config.json, so it is not a transformers "
                "model saved with save_pretrained")
    if path.exists():
        return f"model {text!r} is a file, not a model directory"
    if not HUB_ID.match(text):
        return f"model {text!r}: no such directory, and not a valid Hub id, so it is not a model directory"
    return None
