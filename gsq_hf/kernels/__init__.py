"""Fused GPU kernels for the quantized state cache, each with a plain torch reference twin.

* `gsq_hf.kernels.state_update.state_update` — one Triton pass per decode step: read the stored state in
  its format, update it in fp32, choose formats, re-quantize, write (needs ``triton``: ``pip install
  "gsq_hf[triton]"``; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
* `state_update_reference` — the same step from `gsq_hf.formats` and the policies (torch only).

Importing this package needs torch only; the Triton module is imported explicitly (the adapters import it
at their first fused decode step). Dispatch rules: `gsq_hf.kernels.state_update`.
"""

from .reference import StateUpdate, state_update_reference, unsupported_reason

__all__ = ["StateUpdate", "state_update_reference", "unsupported_reason"]
