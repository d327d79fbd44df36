"""Recurrent layers in transformers that are not a Mamba SSM state: `gsq_hf.patch` refuses models holding them.

The adapters run the diagonal recurrence ``h = exp(Δ·A)·h + Δ·B·x`` and read their gate from Δ·A. The layers
below keep another kind of state (a delta-rule fast-weight matrix, a conv window only, an RG-LRU vector, ...);
patching the Mamba layers around them would leave their state in a cache layer gsq_hf does not own, so the
whole model is refused, naming the layer type found. docs/support.md lists the same table.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["REFUSED", "Refusal", "find_refusal"]


@dataclass(frozen=True)
class Refusal:
    kind: str  # what the layer is, as the error message names it
    reason: str  # why its state is not a Mamba SSM state (one line)
    families: tuple[str, ...]  # transformers model types that use it
    mixer_classes: tuple[str, ...]  # class names of those layers in transformers 5.24


REFUSED: tuple[Refusal, ...] = (
    Refusal(
        "gated delta-net",
        "a per-head fast-weight matrix updated by the delta rule S = g·(I - β·k·kᵀ)·S + β·k·vᵀ, not a diagonal "
        "Ā·h + B̄x recurrence",
        ("qwen3_next", "qwen3_5", "qwen3_5_moe", "olmo_hybrid", "lara_mini", "qwen4_exp"),
        ("Qwen3NextGatedDeltaNet", "Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet", "OlmoHybridGatedDeltaNet",
         "LaraMiniGatedDeltaNet", "Qwen4ExpTextGatedDeltaNet"),
    ),
    Refusal(
        "Kimi delta attention",
        "a gated delta rule with per-channel decay over a (head_k × head_v) matrix state, not a diagonal SSM",
        ("kimi_linear", "bailing_hybrid", "glm5_next"),
        ("KimiLinearDeltaAttention", "BailingHybridDeltaAttention", "Glm5NextTextLinearAttention"),
    ),
    Refusal(
        "lightning attention",
        "a linear-attention key·value matrix state with a constant per-head decay: no input-dependent Δ to gate on",
        ("minimax",),
        ("MiniMaxLightningAttention",),
    ),
    Refusal(
        "short convolution",
        "only a conv window of a few tokens is carried, no SSM state to quantize",
        ("lfm2", "lfm2_moe", "lfm3", "inkling", "inkling2", "inkling2_loop"),
        ("Lfm2ShortConv", "Lfm2MoeShortConv", "Lfm3ShortConv", "InklingShortConvolution",
         "Inkling2ShortConvolution", "Inkling2DynamicShortConvolution", "Inkling2LoopShortConvolution",
         "Inkling2LoopDynamicShortConvolution"),
    ),
    Refusal(
        "compressed convolutional attention",
        "attention with a conv window and one delayed value projection as its only recurrent state",
        ("zaya",),
        ("ZayaCCAProjection",),
    ),
    Refusal(
        "RWKV time-mixing",
        "a WKV numerator/denominator/max state per channel, kept in RWKV's own state tuple, not a transformers cache",
        ("rwkv",),
        ("RwkvSelfAttention",),
    ),
    Refusal(
        "xLSTM",
        "an mLSTM matrix memory with exponential gates and a normalizer state, kept in xLSTM's own cache",
        ("xlstm",),
        ("xLSTMBlock",),
    ),
    Refusal(
        "RG-LRU recurrent",
        "a per-channel vector state (no d_state axis) kept on the module itself, not in a cache",
        ("recurrent_gemma",),
        ("RecurrentGemmaRecurrentBlock",),
    ),
)


def find_refusal(module: nn.Module) -> Refusal | None:
    """The refusal entry whose layer ``module`` is, or None."""
    name = type(module).__name__
    return next((entry for entry in REFUSED if name in entry.mixer_classes), None)
