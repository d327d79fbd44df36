"""Replay rollback: keep a forward's per-token scan inputs instead of per-token states (the ReplaySSM idea).

While a cache records inputs (`GSQCache.record_inputs`), every multi-token forward of a Mamba layer keeps, per
token, what its recurrence needs beside the weights: the conv inputs (the window after token t is the last K of
them), Δ, and x and B (Ā = exp(Δ·A) and B̄x = Δ·B·x are recomputed from them; C only reads out). x (and B on
Mamba2, where it comes out of the conv too) are not kept when they are views of the conv's output: a replay runs
the forward's conv again, the same call on the same tensors, so it gets the same bits, and takes the same view.
`replay` returns a layer to the state after its first n recorded tokens: from the state at the start of the
recording it re-runs the conv window and the recurrence over those n tokens with the layer's own writes
(``every_step``: the stored value is what the next token reads), so it stores bit for bit the state the forward
wrote after token n. Per token this keeps conv_dim + units + N values on Mamba-1 (conv_dim + heads on Mamba2)
against a whole state per token for checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .scan import selective_scan
from .step import discretize, rotated_basis, unit_gate
from .store import LayerStorage, read_state, select_rows

__all__ = ["keep_conv_inputs", "keep_scan_inputs", "recorded_tokens", "replay", "replay_read_nbytes",
           "step_inputs_nbytes"]


@dataclass(frozen=True)
class _ConvOutputView:
    """Where a scan input sits in its forward's conv output (kept instead of the tensor)."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def of(self, conv_output: torch.Tensor) -> torch.Tensor:
        return conv_output.as_strided(self.size, self.stride, self.offset)


def keep_conv_inputs(layer, inputs: torch.Tensor, output: torch.Tensor,
                     recompute: Callable[[], torch.Tensor]) -> None:
    """Start the record of one forward: its conv ``inputs`` (B, C, T), the conv ``output`` and how to compute that
    output again (the same call on the same tensors)."""
    layer.step_inputs.append({"conv": inputs.transpose(1, 2), "output": output, "recompute": recompute})


def keep_scan_inputs(layer, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    """The scan inputs of the forward whose conv inputs were kept last (time on dim 1, `gsq_hf.step`'s shapes)."""
    record = layer.step_inputs[-1]
    output = record.pop("output")
    for name, value in (("x", x), ("B", B)):
        shares = (value.dtype == output.dtype
                  and value.untyped_storage().data_ptr() == output.untyped_storage().data_ptr())
        record[name] = _ConvOutputView(tuple(value.shape), value.stride(), value.storage_offset()) if shares else value
    record["dt"], record["A"] = dt, A


def _kept_tensors(record: dict) -> list[torch.Tensor]:
    return [value for name, value in record.items() if name != "A" and isinstance(value, torch.Tensor)]


def step_inputs_nbytes(layer) -> int:
    """Bytes of the per-token inputs ``layer`` keeps."""
    return sum(value.nelement() * value.element_size() for record in layer.step_inputs
               for value in _kept_tensors(record))


def replay_read_nbytes(layer, num_tokens: torch.Tensor) -> int:
    """Bytes replays of ``num_tokens`` (one count per replayed row) read back in all: per row, the kept inputs of
    its tokens, and the conv inputs of every token of a recorded forward whose conv output it computes again."""
    total, start = 0, 0
    for record in layer.step_inputs:
        length = record["conv"].shape[1]
        n = (num_tokens - start).clamp(0, length)
        for name, value in record.items():
            if name != "A" and isinstance(value, torch.Tensor):
                tokens = torch.where(n > 0, length, 0) if name == "conv" and _recomputes(record) else n
                total += int(tokens.sum()) * (value[0, 0].nelement() * value.element_size())
        start += length
    return total


def _recomputes(record: dict) -> bool:
    return any(isinstance(record.get(name), _ConvOutputView) for name in ("x", "B"))


def recorded_tokens(layer) -> int:
    """How many tokens ``layer`` can replay (0 when it kept nothing)."""
    if not layer.step_inputs or any("x" not in record for record in layer.step_inputs):
        return 0  # a single-token forward (not recorded by the scan) ran while recording: nothing is replayable
    return sum(record["conv"].shape[1] for record in layer.step_inputs)


def _recorded(layer, names: tuple[str, ...], n: int) -> list[torch.Tensor]:
    """Inputs ``names`` of the first ``n`` recorded tokens; views of a conv output take it computed again."""
    parts = {name: [] for name in names}
    for record in layer.step_inputs:
        output = record["recompute"]() if _recomputes(record) else None
        for name in names:
            value = record[name]
            parts[name].append(value.of(output) if isinstance(value, _ConvOutputView) else value)
    return [(torch.cat(values, dim=1) if len(values) > 1 else values[0])[:, :n] for values in parts.values()]


def replay(layer, start: LayerStorage, num_tokens: int | torch.Tensor) -> None:
    """Store in ``layer`` the state after the first ``num_tokens`` recorded tokens (an int, or (batch,) counts:
    each row its own), from ``start`` (the state when recording began), by re-running the conv window and the
    recurrence over them."""
    per_row = torch.is_tensor(num_tokens) and bool((num_tokens != num_tokens.max()).any())
    n = int(num_tokens.max()) if torch.is_tensor(num_tokens) else num_tokens
    x, dt, B, conv = _recorded(layer, ("x", "dt", "B", "conv"), n)
    A = layer.step_inputs[0]["A"]
    layer.storage = start
    window, kernel = layer.read_conv(), layer.conv_shape[-1]
    if window is None:
        window = conv.new_zeros(conv.shape[0], conv.shape[2], kernel)
    windows = []
    for t in range(n):  # the window writes of `causal_conv_stepwise` (exact whether or not the format is lossy)
        window = layer.write_conv(torch.cat([window[..., 1:], conv[:, t, :, None]], dim=-1))
        windows.append(layer.storage.conv)
    rotated = rotated_basis(layer.policy, A)  # the basis the forward carried its state in
    dA, dBx, _ = discretize(x, dt, A, B, B, rotated)  # the read-out (C) is not needed to replay states: B stands in
    gate = unit_gate(dA, A) if "gate" in layer.policy.signals else None
    stored = read_state(start, rotated)
    h = torch.zeros_like(dBx[:, 0]) if stored is None else stored
    states = []

    def write(state: torch.Tensor, t: int) -> torch.Tensor | None:
        read = layer.write_ssm(state, None if gate is None else gate[:, t], read_back=per_row or t < n - 1,
                               rotated=rotated)
        if per_row:
            states.append(replace(layer.storage, conv=windows[t]))
        return read

    selective_scan(h, dA, dBx, None, write, x.dtype)
    if per_row:
        layer.storage = select_rows(states, num_tokens.to(torch.long) - 1)
