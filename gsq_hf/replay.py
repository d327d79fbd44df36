"""Replay rollback: keep a forward's per-token scan inputs instead of per-token states (the ReplaySSM idea).

While a cache records inputs (`GSQCache.record_inputs`), every multi-token forward of a Mamba layer keeps, per
token, what its recurrence needs beside the weights: the conv inputs (the window after token t is the last K of
them) and the SSM's x, Δ and B (Ā = exp(Δ·A) and B̄x = Δ·B·x are recomputed from them; C only reads out).
`replay` returns a layer to the state after its first n recorded tokens: from the state at the start of the
recording it re-runs the conv window and the recurrence over those n tokens with the layer's own writes
(``every_step``: the stored value is what the next token reads), so it stores bit for bit the state the forward
wrote after token n. Per token this keeps about (conv_dim + 2·units + N) values, against a whole state per token
for checkpoints.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .scan import selective_scan
from .step import discretize, unit_gate
from .store import LayerStorage, read_state, select_rows

__all__ = ["keep_step_inputs", "recorded_tokens", "replay", "step_inputs_nbytes"]


def keep_step_inputs(layer, **inputs: torch.Tensor) -> None:
    """Append one forward's inputs to ``layer``'s record: ``conv`` (B, T, conv_dim), ``x``, ``dt``, ``B`` with
    time on dim 1 (`gsq_hf.step`'s shapes); ``A`` (a parameter, not per token) is kept as given."""
    kept = layer.step_inputs
    for name, value in inputs.items():
        kept[name] = value if name == "A" or name not in kept else torch.cat([kept[name], value], dim=1)


def step_inputs_nbytes(layer, num_tokens: int | None = None) -> int:
    """Bytes of the per-token inputs ``layer`` keeps (of the first ``num_tokens`` tokens; all by default)."""
    return sum(value[:, :num_tokens].nelement() * value.element_size()
               for name, value in layer.step_inputs.items() if name != "A")


def recorded_tokens(layer) -> int:
    """How many tokens ``layer`` can replay (0 when it kept nothing)."""
    kept = layer.step_inputs
    if "x" not in kept or "conv" not in kept or kept["conv"].shape[1] != kept["x"].shape[1]:
        return 0  # a single-token forward (not recorded by the scan) ran while recording: nothing is replayable
    return kept["x"].shape[1]


def replay(layer, start: LayerStorage, num_tokens: int | torch.Tensor) -> None:
    """Store in ``layer`` the state after the first ``num_tokens`` recorded tokens (an int, or (batch,) counts:
    each row its own), from ``start`` (the state when recording began), by re-running the conv window and the
    recurrence over them."""
    kept = layer.step_inputs
    per_row = torch.is_tensor(num_tokens) and bool((num_tokens != num_tokens.max()).any())
    n = int(num_tokens.max()) if torch.is_tensor(num_tokens) else num_tokens
    layer.storage = start
    window, kernel = layer.read_conv(), layer.conv_shape[-1]
    conv = kept["conv"][:, :n]  # (B, n, conv_dim)
    if window is None:
        window = conv.new_zeros(conv.shape[0], conv.shape[2], kernel)
    windows = []
    for t in range(n):  # the window writes of `causal_conv_stepwise` (exact whether or not the format is lossy)
        window = layer.write_conv(torch.cat([window[..., 1:], conv[:, t, :, None]], dim=-1))
        windows.append(layer.storage.conv)
    x, dt, B, A = kept["x"][:, :n], kept["dt"][:, :n], kept["B"][:, :n], kept["A"]
    dA, dBx, _ = discretize(x, dt, A, B, B)  # the read-out (C) is not needed to replay states: B stands in
    gate = unit_gate(dA, A) if "gate" in layer.cache.policy.signals else None
    stored = read_state(start)
    h = torch.zeros_like(dBx[:, 0]) if stored is None else stored
    states = []

    def write(state: torch.Tensor, t: int) -> torch.Tensor | None:
        read = layer.write_ssm(state, None if gate is None else gate[:, t], read_back=per_row or t < n - 1)
        if per_row:
            states.append(replace(layer.storage, conv=windows[t]))
        return read

    selective_scan(h, dA, dBx, None, write, x.dtype)
    if per_row:
        layer.storage = select_rows(states, num_tokens.to(torch.long) - 1)
