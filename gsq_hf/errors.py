"""Exceptions gsq_hf raises on bad input: each one says what was wrong and what is accepted."""

from __future__ import annotations

__all__ = ["GSQConfigError", "NotPatchedError", "UnsupportedModelError", "UnsupportedVersionError"]


class UnsupportedModelError(TypeError):
    """The model has no mixer any registered adapter can patch, or holds a recurrent layer that is not Mamba's."""


class GSQConfigError(ValueError):
    """A `GSQConfig` field, preset name or format name is not one of the accepted values."""


class NotPatchedError(RuntimeError):
    """`unpatch` (or a patched-only operation) was called on a model that `patch` never touched."""


class UnsupportedVersionError(ImportError):
    """The installed transformers is outside the range gsq_hf is tested with."""
