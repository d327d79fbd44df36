"""`generate_graph`: greedy decoding of a patched model whose decode step is one CUDA graph (eager elsewhere).

    gsq_hf.patch(model, "int8")
    sequences = gsq_hf.generate_graph(model, input_ids, max_new_tokens=64)   # == model.generate(...) greedy

The prompt runs as an ordinary forward into a static `GSQCache` (buffers allocated at its first write, written
in place after); each decode step (forward of one token, argmax, EOS bookkeeping) then runs on fixed-address
tensors with no host sync, so on CUDA it is captured once in a `torch.cuda.CUDAGraph` and replayed per token;
on CPU the same step runs eagerly. The host looks at the device only every ``check_every`` steps: whether every
row has finished, and whether a write met a NaN/Inf state (`GSQCache.nonfinite_layers`). A static cache keeps
no fp32 copies of such units, so a flagged run is redone from the prompt with the default cache, which stores
them in fp32 as ``generate`` does, with a warning naming the layers: the result is what ``generate`` gives.

Why a loop of our own rather than transformers' compile path (``cache.is_compileable``, ``torch.compile(...,
mode="reduce-overhead")``): docs/design.md.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .cache import GSQCache
from .errors import GSQConfigError, NotPatchedError

__all__ = ["generate_graph"]

WARMUP_STEPS = 2  # eager decode steps before the capture (Triton compiles and allocators warm up on them)


def generate_graph(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                   attention_mask: torch.Tensor | None = None, cache: GSQCache | None = None,
                   eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                   use_graph: bool | None = None, check_every: int = 16) -> torch.Tensor:
    """Greedy ``(batch, prompt + new)`` token ids, as ``model.generate(input_ids, do_sample=False,
    max_new_tokens=...)`` returns them for a patched pure-Mamba model (no logits processors are applied).

    ``cache``: an empty static `GSQCache` to write (default: a new one with the patch's config; its
    ``memory_report()`` then describes the run). ``attention_mask`` masks the prompt (left padding); new tokens
    are never padding. ``eos_token_id`` / ``pad_token_id`` default to the model's generation config (``[]``: no
    EOS); finished rows get the pad token, as in ``generate``. ``use_graph``: capture the decode step in a CUDA graph
    (default: on CUDA tensors). ``check_every``: decode steps between the host's looks at the device (stop when
    every row has finished; redo a run whose state went NaN/Inf).
    """
    if getattr(model, "_gsq_patch", None) is None:
        raise NotPatchedError("generate_graph needs a model patched by gsq_hf.patch(model, config)")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1 or not isinstance(check_every, int) \
            or check_every < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} and check_every={check_every!r} must be integers >= 1")
    graph = input_ids.is_cuda if use_graph is None else use_graph
    if graph and not input_ids.is_cuda:
        raise ValueError("use_graph=True captures a CUDA graph: it needs CUDA tensors (use_graph=False runs the same "
                         "step eagerly)")
    cache = cache if cache is not None else GSQCache(model, model._gsq_patch.config, static=True)
    _check_cache(cache, graph)
    generation = model.generation_config
    eos = generation.eos_token_id if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else generation.pad_token_id
    eos = None if eos is None or eos == [] else torch.tensor(eos, device=input_ids.device).view(-1)  # []: none
    if eos is not None and pad is None:
        pad = int(eos[0])
    run = _Decode(model, input_ids, attention_mask, max_new_tokens, eos, pad, check_every)
    deferred, cache.defer_finite_check = cache.defer_finite_check, True
    try:
        with torch.no_grad():
            sequences = run(cache, graph)
            flagged = cache.nonfinite_layers()
            if flagged:
                warnings.warn(f"gsq_hf: non-finite SSM state in layer(s) {flagged} of the static cache; this "
                              "generation is redone with the default GSQCache, which keeps those units in fp32",
                              RuntimeWarning, stacklevel=2)
                sequences = run(GSQCache(model, cache.config), graph=False)
    finally:
        cache.defer_finite_check = deferred
    return sequences


def _check_cache(cache: GSQCache, graph: bool) -> None:
    if not cache.static:
        raise ValueError("generate_graph writes its cache in place: pass GSQCache(model, config, static=True), or no "
                         "cache (one is made)")
    if any(layer.has_state for layer in cache.gsq_layers):
        raise ValueError("generate_graph starts from the prompt: pass an empty static cache (cache.reset() empties "
                         "one)")
    if cache.has_attention_kv:
        raise ValueError("generate_graph decodes pure Mamba models: the attention KV of a hybrid grows every step, "
                         "which a fixed-shape step cannot hold; use model.generate")
    if graph and cache.tracing:
        raise ValueError("a CUDA graph replays the precision trace's first step only; stop_trace() first, or "
                         "use_graph=False")


class _Decode:
    """One greedy generation: the prompt forward, then decode steps on fixed-address tensors."""

    def __init__(self, model, input_ids, attention_mask, max_new_tokens, eos, pad, check_every):
        self.model, self.input_ids, self.attention_mask = model, input_ids, attention_mask
        self.max_new_tokens, self.eos, self.pad, self.check_every = max_new_tokens, eos, pad, check_every

    def __call__(self, cache: GSQCache, graph: bool) -> torch.Tensor:
        batch, device = self.input_ids.shape[0], self.input_ids.device
        token = torch.empty(batch, 1, dtype=torch.long, device=device)  # the step's input, then its output
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        logits = self.model(self.input_ids, attention_mask=self.attention_mask, cache=cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1]
        self._select(logits, token, unfinished)
        tokens, alive = [token.clone()], [unfinished.any()]
        step = functools.partial(self.step, cache, token, unfinished)
        captured, drawn = None, _generator_states(cache)
        for index in range(1, self.max_new_tokens):
            if index % self.check_every == 0 and self._stop(alive[-1], cache):
                break
            if captured is not None:
                captured.replay()
            elif graph and index > WARMUP_STEPS:  # the eager steps before were real decode steps
                captured = _capture(step, cache, drawn)
                captured.replay()
            else:
                _warm(step, graph)
            tokens.append(token.clone())
            alive.append(unfinished.any())
        return torch.cat([self.input_ids, _until_finished(torch.cat(tokens, dim=1), alive)], dim=1)

    def step(self, cache: GSQCache, token: torch.Tensor, unfinished: torch.Tensor) -> None:
        """One decode step on fixed-address tensors, ``token`` (batch, 1) in and out: what the CUDA graph captures
        (no host sync, no Python branch on a tensor's value)."""
        logits = self.model(token, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        self._select(logits, token, unfinished)

    def _select(self, logits: torch.Tensor, token: torch.Tensor, unfinished: torch.Tensor) -> None:
        """Greedy next token into ``token``; finished rows take the pad token (in place: no host sync)."""
        chosen = logits.argmax(dim=-1)
        if self.eos is not None:
            chosen = torch.where(unfinished, chosen, self.pad)
            unfinished.logical_and_(~torch.isin(chosen, self.eos))
        token.copy_(chosen[:, None])

    @staticmethod
    def _stop(alive: torch.Tensor, cache: GSQCache) -> bool:
        """Every row finished, or a NaN/Inf state flagged (redone by the caller): the host's look at the device."""
        return not bool(alive) or bool(getattr(cache, "nonfinite_layers", list)())  # any cache: the bench's baseline


def _warm(step: Callable[[], None], graph: bool) -> None:
    """An eager decode step; before a capture, on a side stream (as torch.cuda.graphs' warm-up asks)."""
    if not graph:
        step()
        return
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)


def _generator_states(cache: GSQCache) -> dict[str, torch.Tensor]:
    return {device: generator.get_state() for device, generator in getattr(cache, "_generators", {}).items()}


def _capture(step: Callable[[], None], cache: GSQCache, drawn: dict[str, torch.Tensor]) -> torch.cuda.CUDAGraph:
    """``step`` captured (not run) in a CUDA graph; its tensors' addresses are fixed from now on. ``drawn``:
    the stochastic-rounding generators' states before the warm-up steps (they must not have drawn)."""
    now = _generator_states(cache)
    if now.keys() != drawn.keys() or any(not torch.equal(now[key], drawn[key]) for key in now):
        raise GSQConfigError("stochastic rounding on the torch path draws from a torch.Generator that a CUDA graph "
                             "does not advance; use a config the fused kernel runs (kernel='auto'), or "
                             "use_graph=False")
    captured = torch.cuda.CUDAGraph()
    with torch.cuda.graph(captured):
        step()
    return captured


def _until_finished(tokens: torch.Tensor, alive: list[torch.Tensor]) -> torch.Tensor:
    """``tokens`` (batch, steps) up to the step after which no row was unfinished (``generate`` stops there)."""
    done = (~torch.stack(alive)).nonzero()
    return tokens if done.numel() == 0 else tokens[:, : int(done[0, 0]) + 1]
