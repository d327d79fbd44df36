"""Built-in offline default for ``gsq-hf eval``.

With no arguments, evaluation must run without network access and without any
data outside the package.  The model is a tiny Mamba trained by
``scripts/train_default_model.py`` and shipped in ``gsq_hf/assets``; the text
is the standard library's ``pydoc_data.topics`` (the ``help()`` topics), which
every CPython install has, so no text is copied into the repository.
"""

from pathlib import Path
from pydoc_data.topics import topics

BUILTIN_MODEL_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "tiny-mamba-pydoc"

_SPLITS = ("train", "test")
_HOLDOUT_EVERY = 10  # every 10th topic in key order (0, 10, 20, ...) is the "test" split


def builtin_text(split: str) -> str:
    """Return the ``train`` (~90% of topics) or ``test`` (~10%) split of the pydoc topics.

    Topics are sorted by key; the topic at sorted index ``i`` is held out when
    ``i % 10 == 0`` (8 of 79 topics on CPython 3.11).  Topics are joined with blank lines.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    held_out = split == "test"
    return "\n\n".join(topics[key] for i, key in enumerate(sorted(topics)) if (i % _HOLDOUT_EVERY == 0) == held_out)
