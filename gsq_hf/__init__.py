"""gsq_hf: gated state quantization for Mamba-family models in HuggingFace transformers.

    import gsq_hf
    gsq_hf.patch(model, "gsq-gate")      # a preset name, a YAML path, a dict or a GSQConfig
    out = model.generate(input_ids, max_new_tokens=64, return_dict_in_generate=True)
    out.cache.memory_report()
    gsq_hf.unpatch(model)
"""

from .cache import GSQCache
from .config import GSQConfig, list_presets, resolve_config
from .errors import GSQConfigError, NotPatchedError, UnsupportedModelError, UnsupportedVersionError
from .formats import FORMATS, get_format
from .patch import from_pretrained, is_patched, patch, patched, unpatch
from .speculative import speculative_generate

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "GSQCache",
    "GSQConfig",
    "GSQConfigError",
    "NotPatchedError",
    "UnsupportedModelError",
    "UnsupportedVersionError",
    "from_pretrained",
    "get_format",
    "is_patched",
    "list_presets",
    "patch",
    "patched",
    "resolve_config",
    "speculative_generate",
    "unpatch",
]
