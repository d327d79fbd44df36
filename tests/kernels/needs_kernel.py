"""Imported first by the kernel test modules: skips the module without triton, or on CPU without Triton's
interpreter (TRITON_INTERPRET=1 must be set before triton is imported)."""

import os

import pytest
import torch

pytest.importorskip("triton", reason="the fused kernel needs triton: pip install 'gsq_hf[triton]'",
                    exc_type=ImportError)
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device: run with TRITON_INTERPRET=1 to test the kernel on CPU (Triton's interpreter)",
                allow_module_level=True)
