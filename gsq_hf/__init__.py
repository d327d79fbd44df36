"""gsq_hf: gated state quantization for Mamba-family models in HuggingFace transformers.

    import gsq_hf
    gsq_hf.patch(model, "gsq-gate")      # a preset name, a YAML path, a dict or a GSQConfig
    out = model.generate(input_ids, max_new_tokens=64, return_dict_in_generate=True)
    out.cache.memory_report()
    gsq_hf.unpatch(model)
"""

from .cache import GSQCache
from .config import BudgetConfig, EntropyConfig, GateConfig, GSQConfig, StaticConfig, list_presets, resolve_config
from .errors import GSQConfigError, NotPatchedError, UnsupportedModelError, UnsupportedVersionError
from .formats import FORMATS, get_format
from .graph import generate_graph
from .patch import from_pretrained, is_patched, patch, patched, unpatch
from .policies import register_policy
from .speculative import speculative_generate

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "BudgetConfig",
    "EntropyConfig",
    "GSQCache",
    "GSQConfig",
    "GSQConfigError",
    "GateConfig",
    "NotPatchedError",
    "StaticConfig",
    "UnsupportedModelError",
    "UnsupportedVersionError",
    "from_pretrained",
    "generate_graph",
    "get_format",
    "is_patched",
    "list_presets",
    "patch",
    "patched",
    "register_policy",
    "resolve_config",
    "speculative_generate",
    "unpatch",
]
