"""Fused GPU kernels for the quantized state cache, each with a plain torch reference twin.

* `gsq_hf.kernels.state_update.state_update` — one Triton pass per decode step: read the stored state in
  its format, update it in fp32, choose formats, re-quantize, write (needs ``triton``: ``pip install
  "gsq_hf[triton]"``; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
* `state_update_reference` — the same step in torch, from the functions CPU decode steps run (`gsq_hf.step`,
  `gsq_hf.store`).
* `gsq_hf.kernels.conv_step.conv_step` — a decode step's depthwise conv in one Triton launch (window shift, conv,
  SiLU, window store); Mamba2's runs inside `state_update` (``conv=``). Twin: `conv_step_reference`.

Importing this package needs torch only; the Triton module is imported explicitly (`gsq_hf.step` imports it
at the first decode step that may use it). Dispatch rules: `gsq_hf.step.kernel_reason` and docs/design.md.
"""

from .reference import ConvStep, StateUpdate, conv_step_reference, state_update_reference, unsupported_reason

__all__ = ["ConvStep", "StateUpdate", "conv_step_reference", "state_update_reference", "unsupported_reason"]
