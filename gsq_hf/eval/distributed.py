"""``gsq-hf eval`` over several processes: windows sharded by whole batches, weighted sums gathered.

    torchrun --standalone --nproc_per_node 2 -m gsq_hf.cli eval --device cpu ...   # CPU processes (gloo)
    accelerate launch --num_processes 4 -m gsq_hf.cli eval ...                      # one GPU per process (nccl)

Every process loads the model and cuts the same token windows, then evaluates a contiguous share of whole
batches (`accelerate.PartialState.split_between_processes` over the batch indices). A batch holds the same
windows as in a one-process run with the same ``--batch-size``, so every window's NLL is computed exactly as
there and only the order of the float64 sum over batches changes. The weighted sums (ΣNLL, tokens, words,
bytes) and the per-sequence state summaries are gathered (``accelerate.utils.gather_object``) and combined
on every process; only the main process prints and writes files. Without a launcher (``WORLD_SIZE`` unset
or 1) `Processes` is a no-op: nothing distributed is imported or started.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch

from .data import TokenWindows
from .perplexity import PerplexityResult

__all__ = ["Processes", "merge_results"]


class Processes:
    """The processes this evaluation runs on (one unless started by torchrun / accelerate launch)."""

    def __init__(self, device: str = "cpu"):
        self.state = None
        self.device = device
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            cpu = torch.device(device).type == "cpu"
            self.state = PartialState(cpu=cpu)  # gloo on CPU, nccl on CUDA (one GPU per process)
            if not cpu and torch.device(device).index is None:
                self.device = str(self.state.device)

    @property
    def count(self) -> int:
        return self.state.num_processes if self.state is not None else 1

    @property
    def index(self) -> int:
        return self.state.process_index if self.state is not None else 0

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def shard(self, windows: TokenWindows, batch_size: int) -> TokenWindows:
        """This process's share of ``windows``: whole batches of ``batch_size``, contiguous, in order."""
        if self.state is None:
            return windows
        total = windows.ids.shape[0]
        with self.state.split_between_processes(list(range(math.ceil(total / batch_size)))) as batches:
            rows = slice(batches[0] * batch_size, min((batches[-1] + 1) * batch_size, total)) if batches else slice(0)
        return TokenWindows(windows.ids[rows], windows.words[rows], windows.bytes[rows])

    def combine(self, result: PerplexityResult | None, error: str | None) -> tuple[PerplexityResult | None, str | None]:
        """Every process's outcome of one evaluation, combined (the same on every process).

        ``result`` is None where this process had no windows or failed (``error`` then says why). A failure
        anywhere fails the whole evaluation. The local ``trace`` is kept: the main process's covers the first
        batch of the whole run.
        """
        if self.state is None:
            return result, error
        from accelerate.utils import gather_object

        mine = None if result is None else dataclasses.replace(result, trace=None, reference=None)
        outcomes = gather_object([(self.index, mine, error)])
        errors = [f"process {index}: {message}" for index, _, message in outcomes if message]
        if errors:
            return None, "; ".join(errors)
        merged = merge_results([part for _, part, _ in sorted(outcomes, key=lambda o: o[0]) if part is not None])
        # trace and the kept reference stay local: this process scores its own windows against its reference
        return dataclasses.replace(merged, trace=getattr(result, "trace", None),
                                   reference=getattr(result, "reference", None)), None

    def close(self) -> None:
        """Tear the process group down together: a process that leaves while a peer still talks to it aborts
        the peer ("terminate called without an active exception", seen once on a loaded 2-core CI machine)."""
        if self.state is not None and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def merge_results(parts: list[PerplexityResult]) -> PerplexityResult:
    """One result from the results of disjoint window sets (in window order).

    Sums add up (per-window ΣNLL and KL sums are concatenated); ``seconds`` is the longest part (the parts ran at the
    same time); the per-sequence state summary combines as in one run: sizes take the largest, counts add up,
    averages and fractions are weighted by each part's scored tokens (windows have equal length, so this is a
    weighting by windows).
    """
    weights = [part.tokens for part in parts]
    return PerplexityResult(
        config=parts[0].config,
        nll_sum=sum(part.nll_sum for part in parts),
        tokens=sum(weights),
        words=sum(part.words for part in parts),
        bytes=sum(part.bytes for part in parts),
        seconds=max(part.seconds for part in parts),
        state=_merge([part.state for part in parts], weights, ""),
        window_kl_sum=(None if any(part.window_kl_sum is None for part in parts)
                       else tuple(kl for part in parts for kl in part.window_kl_sum)),
        top1_agree=None if any(part.top1_agree is None for part in parts) else sum(p.top1_agree for p in parts),
        window_nll_sum=(None if any(part.window_nll_sum is None for part in parts)
                        else tuple(nll for part in parts for nll in part.window_nll_sum)),
    )


def _merge(values: list[Any], weights: list[int], key: str) -> Any:
    first = values[0]
    if isinstance(first, dict):
        keys = list(dict.fromkeys(k for value in values for k in value))
        default = 0.0 if all(isinstance(v, float) for value in values for v in value.values()) else None
        return {k: _merge([value.get(k, default) for value in values], weights, k) for k in keys}
    if isinstance(first, bool) or not isinstance(first, (int, float)) or any(v is None for v in values):
        return first
    if key.endswith("_bytes"):
        return max(values)
    if isinstance(first, int):
        return sum(values)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)
