"""Per-family adapters, registered by family name; importing this package registers them all.

The two base families register first, so that messages list them before the variants built on them.
"""

from . import mamba, mamba2  # noqa: F401, I001  (registration, in this order)
from . import bamba, falcon_h1, falcon_mamba, granitemoehybrid, jamba, nemotron_h, zamba, zamba2  # noqa: F401
from .base import ADAPTERS, MixerAdapter, find_adapter, register_adapter

__all__ = ["ADAPTERS", "MixerAdapter", "find_adapter", "register_adapter"]
