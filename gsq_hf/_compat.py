"""Every difference between supported transformers versions lives here, nowhere else.

Supported: transformers 5.24.x (the `cache=` keyword, `LinearAttentionLayer`, `get_recurrent_state`).
"""

from __future__ import annotations

import transformers
from packaging.version import Version

from .errors import UnsupportedVersionError

MIN_TRANSFORMERS = Version("5.24.0")
MAX_TRANSFORMERS_EXCLUSIVE = Version("5.25.0")
TRANSFORMERS_VERSION = Version(transformers.__version__)

# Name of the keyword that carries the cache through `forward` (was `cache_params` before 5.24); 5.24 still
# accepts the older names (with a deprecation warning), so a cache passed under any of them is the cache.
CACHE_KWARG = "cache"
CACHE_KWARG_ALIASES = ("cache", "cache_params", "past_key_values")


def check_transformers_version() -> None:
    """Raise `UnsupportedVersionError` unless the installed transformers is in the supported range."""
    if not (MIN_TRANSFORMERS <= TRANSFORMERS_VERSION < MAX_TRANSFORMERS_EXCLUSIVE):
        raise UnsupportedVersionError(
            f"gsq_hf supports transformers >={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}; "
            f"found {transformers.__version__}. Install a supported version, e.g. "
            f"`pip install 'transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS_EXCLUSIVE}'`."
        )


def pop_cache_kwarg(kwargs: dict):
    """Remove and return the cache from a forward's kwargs, whichever name the caller used."""
    cache = None
    for name in CACHE_KWARG_ALIASES:
        if name in kwargs:
            value = kwargs.pop(name)
            cache = value if value is not None else cache
    return cache


def output_cache(output):
    """The cache a `generate` / forward output carries (`cache`, formerly `past_key_values`)."""
    return getattr(output, "cache", None) if hasattr(output, "cache") else getattr(output, "past_key_values", None)
