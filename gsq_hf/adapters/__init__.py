"""Per-family adapters, registered by family name; importing this package registers them all."""

from . import mamba, mamba2  # noqa: F401  (registration)
from .base import ADAPTERS, MixerAdapter, find_adapter, register_adapter

__all__ = ["ADAPTERS", "MixerAdapter", "find_adapter", "register_adapter"]
