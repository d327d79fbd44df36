"""Tiny random Mamba-family models built from config objects (no download), shared by the tests."""

from __future__ import annotations

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

VOCAB = 64


def tiny_mamba(seed: int = 0, **overrides) -> MambaForCausalLM:
    torch.manual_seed(seed)
    config = MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                         conv_kernel=4, time_step_rank=4, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    for key, value in overrides.items():
        setattr(config, key, value)
    return MambaForCausalLM(config).eval()


def tiny_mamba2(seed: int = 0, **overrides) -> Mamba2ForCausalLM:
    torch.manual_seed(seed)
    config = Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, head_dim=8,
                          num_heads=8, n_groups=2, conv_kernel=4, chunk_size=4, pad_token_id=0, eos_token_id=1,
                          bos_token_id=1)
    for key, value in overrides.items():
        setattr(config, key, value)
    return Mamba2ForCausalLM(config).eval()


FAMILIES = {"mamba": tiny_mamba, "mamba2": tiny_mamba2}
