"""The adapter interface: one class per Mamba family owns its mixer's step on a patched instance.

Upstream decode steps write the state in place into the tensor the cache returned, so a cache subclass
never sees a write or Δ. The adapter therefore recomputes the mixer's forward from the mixer's own
sub-modules (always calling ``mixer.dt_proj(...)``, never ``mixer.dt_proj.weight @ ...``, so quantized
weights work) up to the SSM inputs ``x, Δ, A, B, C, D, z``; a single token then goes to `gsq_hf.step.decode_step`
(the fused kernel or its torch twin), several to `scan_forward` (``gsq_hf.scan``), both writing the
`GSQStateLayer` the same way. A single token's conv goes through `gsq_hf.step.decode_conv` (Triton or torch;
Mamba2 hands it to `gsq_hf.step.decode_step_conv`, which may run it inside the state update). A new family is
one small subclass registered here.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import nn

from ..cache import GSQStateLayer
from ..kernels.reference import ConvStep
from ..replay import keep_conv_inputs, keep_scan_inputs
from ..scan import causal_conv, causal_conv_stepwise, selective_scan
from ..step import decode_conv, discretize, rotated_basis, ssm_output, unit_gate

__all__ = ["ADAPTERS", "MixerAdapter", "apply_padding_mask", "find_adapter", "loaded_weights", "register_adapter"]

ADAPTERS: dict[str, type[MixerAdapter]] = {}
SCAN_CHUNK = 64  # tokens per discretized block of a multi-token every_step forward (`MixerAdapter.scan_forward`)


def register_adapter(cls: type[MixerAdapter]) -> type[MixerAdapter]:
    """Class decorator: make ``cls`` available to ``gsq_hf.patch``."""
    ADAPTERS[cls.family] = cls
    return cls


def find_adapter(module: nn.Module) -> MixerAdapter | None:
    """The adapter that handles ``module``, or None if ``module`` is not a known mixer."""
    name = type(module).__name__
    for cls in ADAPTERS.values():
        if name in cls.mixer_classes:
            return cls()
    return None


def apply_padding_mask(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded positions, as upstream does before and after the conv (left padding stays inert)."""
    if attention_mask is None:
        return hidden_states
    return (hidden_states * attention_mask[:, :, None]).to(hidden_states.dtype)


@contextlib.contextmanager
def loaded_weights(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` with its parameters in place on its execution device, for code that reads them without calling it.

    accelerate's offload hooks (``device_map`` with ``"cpu"``/``"disk"`` entries, ``cpu_offload``) load a
    sub-module's weights only around that sub-module's own ``forward`` and leave them on the ``meta`` device
    otherwise; run the hook's pre/post steps around the read, as its ``forward`` would.
    """
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        yield module
        return
    hook.pre_forward(module)
    try:
        yield module
    finally:
        hook.post_forward(module, None)


class MixerAdapter(ABC):
    """How one Mamba family's mixer runs with its states in a `GSQStateLayer`."""

    family: ClassVar[str]
    mixer_classes: ClassVar[tuple[str, ...]]  # class names of the mixers this adapter patches
    unit: ClassVar[str]  # what one policy decision covers: "channel" or "head"

    @abstractmethod
    def d_state(self, mixer: nn.Module) -> int:
        """The SSM state dimension N (quantization groups run along it)."""

    @abstractmethod
    def forward(
        self, mixer: nn.Module, hidden_states: torch.Tensor, layer: GSQStateLayer, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The mixer's output for ``hidden_states`` (B, T, hidden), reading and writing ``layer``."""

    # -- shared steps ----------------------------------------------------------------------------------
    @staticmethod
    def conv(mixer: nn.Module, x: torch.Tensor, layer: GSQStateLayer) -> tuple[torch.Tensor, list | None]:
        """Causal conv of ``x`` (B, C, T) from the stored window; stores the new window. A single token's goes
        through `gsq_hf.step.decode_conv` (the conv kernel, or this torch conv).

        Returns the output and, while the cache records checkpoints, the stored window after each token.
        """
        with loaded_weights(mixer.conv1d) as conv1d:  # the conv's weights are read, not called
            weight, bias = conv1d.weight.squeeze(1), conv1d.bias
            if x.shape[-1] != 1:
                return MixerAdapter._conv(mixer, weight, bias, x, layer)
            return decode_conv(layer, ConvStep(layer.storage.conv, x[..., 0], weight, bias), mixer.activation,
                               lambda: MixerAdapter._conv(mixer, weight, bias, x, layer))

    @staticmethod
    def _conv(mixer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
              layer: GSQStateLayer) -> tuple[torch.Tensor, list | None]:
        previous, recording = layer.read_conv(), layer.cache.recording
        history: list | None = [] if recording else None
        if layer.config.write_mode == "every_step" and not layer.conv_format(x.dtype).represents(x.dtype):

            def write(window: torch.Tensor) -> torch.Tensor:
                read = layer.write_conv(window)
                if recording:
                    history.append(layer.storage.conv)
                return read

            def recompute() -> torch.Tensor:  # what `write` returns (the window read back), nothing stored
                return causal_conv_stepwise(x, previous, weight, bias, mixer.act,
                                            lambda w: layer.quantize_conv(w).dequantize().to(w.dtype))[0]

            out = causal_conv_stepwise(x, previous, weight, bias, mixer.act, write)[0]
        else:
            out, full = causal_conv(x, previous, weight, bias, mixer.act)
            kernel = weight.shape[-1]
            layer.write_conv(full[..., -kernel:])
            if recording:
                history = [layer.quantize_conv(full[..., t + 1 : t + 1 + kernel]) for t in range(x.shape[-1])]

            def recompute() -> torch.Tensor:
                return causal_conv(x, previous, weight, bias, mixer.act)[0]

        if layer.cache.recording_inputs:
            keep_conv_inputs(layer, x, out, recompute)
        return out, history

    @staticmethod
    def scan_forward(layer: GSQStateLayer, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     C: torch.Tensor, D: torch.Tensor, z: torch.Tensor | None,
                     conv_history: list | None = None) -> torch.Tensor:
        """A multi-token forward (B, T, …; `gsq_hf.step`'s shapes): the output (B, T, *S), the state stored per
        the write mode with the same write, gate and output functions as a decode step, in the same basis
        (`gsq_hf.step.rotated_basis`)."""
        if layer.cache.recording_inputs:
            keep_scan_inputs(layer, x, dt, A, B)
        # every_step stores the state after each token anyway, so the tokens can run in chunks: Ā and B̄x of a
        # chunk stay in cache, where the whole forward's (B, T, *S, N) would stream through memory (a 512-token
        # window of the built-in model: 67 MB each). Same products, same order, same stored states.
        chunk = SCAN_CHUNK if layer.config.write_mode == "every_step" else x.shape[1]
        rotated = rotated_basis(layer.policy, A)
        ys = []
        for start in range(0, x.shape[1], chunk):
            part = slice(start, start + chunk)
            dA, dBx, C_part = discretize(x[:, part], dt[:, part], A, B[:, part], C[:, part], rotated)
            gate = unit_gate(dA, A) if "gate" in layer.policy.signals else None  # (B, T, units)
            history = conv_history[part] if conv_history is not None else None
            ys.append(MixerAdapter.scan(layer, dA, dBx, C_part, gate, x.dtype, history, rotated))
        return ssm_output(torch.cat(ys, dim=1) if len(ys) > 1 else ys[0], x, D, z, A)

    @staticmethod
    def scan(
        layer: GSQStateLayer,
        dA: torch.Tensor,
        dBx: torch.Tensor,
        C: torch.Tensor,
        gate: torch.Tensor | None,
        out_dtype: torch.dtype,
        conv_history: list | None = None,
        rotated: bool = False,
    ) -> torch.Tensor:
        """Run the recurrence from the stored state (zeros before the first write) and store per the write mode.

        ``gate`` is (B, T, units): the policy's signal for the write after each step (None if unused). ``rotated``:
        ``dBx`` and ``C`` are in the rotated basis, and so is the state read, carried and written.
        """
        stored = layer.read_ssm(rotated)
        h = torch.zeros_like(dBx[:, 0]) if stored is None else stored  # (B, *state), in dBx's memory layout
        if layer.config.write_mode == "every_step":

            last = dBx.shape[1] - 1

            def write(state: torch.Tensor, t: int) -> torch.Tensor | None:
                read = layer.write_ssm(state, None if gate is None else gate[:, t], read_back=t < last,
                                       rotated=rotated)
                if conv_history is not None:
                    layer.record_position(conv_history[t])
                return read

            outputs, _ = selective_scan(h, dA, dBx, C, write, out_dtype)
        else:
            outputs, h = selective_scan(h, dA, dBx, C, None, out_dtype)
            layer.write_ssm(h, None if gate is None else gate[:, -1], read_back=False, rotated=rotated)
        return outputs
