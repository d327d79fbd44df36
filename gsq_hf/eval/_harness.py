"""`GSQLM`: lm-evaluation-harness's `HFLM` on a gsq_hf-patched model, registered as model ``gsq``.

Imported (and so registered) by `gsq_hf.eval.lm_eval` when lm-eval is installed; see that module.
"""

from __future__ import annotations

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..cache import GSQCache
from ..config import GSQConfig
from ..patch import is_patched, patch
from .stepping import needs_stepping, next_token_logits

__all__ = ["GSQLM"]


@register_model("gsq")
class GSQLM(HFLM):
    """`HFLM` whose model keeps its SSM states per a gsq_hf config.

    ``gsq_config`` is a preset name, a YAML/JSON path, a dict or a `GSQConfig`; ``None`` keeps the patch of
    an already patched ``pretrained`` model, else takes the config saved with the model (else ``gsq-gate``).
    ``device`` defaults to CUDA where there is one, else the CPU (`HFLM`'s default is CUDA, even on a machine
    without one). Every other argument is `HFLM`'s. ``gsq_mode`` says how logits are computed: ``"forward"`` (one
    teacher-forced forward per batch, as `HFLM` does) or ``"stepped"`` (token by token through one
    `GSQCache` per batch, as generation does; for configs that `needs_stepping`). Both go into lm-eval's
    results (``config``, via `get_model_info`).
    """

    def __init__(self, pretrained, gsq_config: GSQConfig | str | dict | None = None, device: str | None = None,
                 **kwargs) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=pretrained, device=device, **kwargs)
        if gsq_config is not None or not is_patched(self.model):
            patch(self.model, gsq_config)
        self.gsq_config: GSQConfig = self.model._gsq_patch.config
        self.gsq_mode = "stepped" if needs_stepping(self.model, self.gsq_config, None) else "forward"

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)`` of ``inps``; stepped configs feed one token per forward.

        `HFLM` pads a batch on the right: a row's padding is fed only after all its real tokens, so it
        reaches none of their logits.
        """
        if self.gsq_mode == "forward":
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            cache = GSQCache(self.model, self.gsq_config)
            return torch.cat([logits for _, logits in next_token_logits(self.model, inps, cache, stepped=True)]
                             ).transpose(0, 1)

    def get_model_info(self) -> dict:
        return {**super().get_model_info(), "gsq_config": self.gsq_config.to_dict(), "gsq_mode": self.gsq_mode}
