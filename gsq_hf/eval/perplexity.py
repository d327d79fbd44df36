"""Decode-faithful perplexity: every state write goes through the config, as in generation.

A quantized state changes what the model sees only through the states it *stores*; generation stores (and
re-reads) the state after every token. `decode_faithful_perplexity` gives each batch of windows a fresh
`GSQCache` and scores the next-token logits in one of two modes (``result.state["evaluation"]``):

* ``"chunked"`` (default where it is faithful): multi-token forwards over the window. With the default
  ``write_mode="every_step"`` the patched scan stores (and re-reads) the state after every token inside a
  forward, exactly as stepping does, at the cost of one forward per chunk instead of one per token. Faithful
  for every policy whose signal exists inside a forward (static, gate, budget); the numbers equal stepping's
  up to float rounding, which can flip a code that sits on a rounding boundary (the chunked scan and the
  one-token step sum in other orders).
* ``"stepped"``: one token at a time. Needed where the signal is the next-token distribution (entropy
  policies: inside one forward there is none) and with ``write_mode="end_of_forward"``; ``stepped=True``
  asks for it anywhere.

Scoring: token 0 of each window is read but not scored (nothing inside the window predicts it; windows
are independent, so no context leaks across them); tokens ``1..context-1`` are scored. Sums are kept like
lm-evaluation-harness does (ΣNLL, tokens, words, bytes), with ΣNLL per window too (``window_nll_sum``: configs
scored on the same windows differ by a paired standard error over them, `gsq_hf.eval.paired`), and the metrics
derived from them:

    perplexity       exp(ΣNLL / tokens)
    word_perplexity  exp(ΣNLL / words)
    byte_perplexity  exp(ΣNLL / bytes)
    bits_per_byte    ΣNLL / (bytes · ln 2)

``position_buckets=`` also splits ΣNLL and token counts by position within the window (`PositionBuckets`):
with one long window per stream, that shows whether a quantized state's error accumulates with length.

Fidelity to a reference run (`ReferenceTopK`): ``keep_reference=k`` keeps each scored token's top-k logits;
another config run with ``reference=`` that gets ``kl_divergence`` (mean KL(reference ‖ config) per token, nats)
and ``top1_agreement``. Δ perplexity mixes fidelity with luck: on a model that is weak on the text, noise in
the state can lower perplexity. KL measures only the distance from the reference's predictions.

Non-finite logits are never averaged: they raise `NonFiniteLogitsError` naming the windows affected.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..cache import GSQCache
from ..config import GSQConfig, resolve_config
from ..patch import is_patched, patched
from .data import EvalInputError, TokenWindows, make_windows
from .paired import mean_stderr
from .positions import PositionBuckets, bucket_labels, bucket_of_step, log_position_buckets
from .stepping import needs_stepping, next_token_logits

__all__ = [
    "NonFiniteLogitsError",
    "PerplexityResult",
    "PositionBuckets",
    "ReferenceTopK",
    "bucket_labels",
    "reference_options",
    "decode_faithful_perplexity",
    "full_sequence_perplexity",
    "log_position_buckets",
]


class NonFiniteLogitsError(ArithmeticError):
    """Some next-token logits were NaN or Inf: the perplexity of that config is undefined."""


@dataclass(frozen=True)
class ReferenceTopK:
    """A reference run's next-token distribution p at every scored token, kept as its top-k logits.

    Scoring a config's distribution q against it gives KL(p ‖ q) over the partition {each of p's top-k tokens,
    every other token}: a lower bound of the full KL (merging outcomes never increases a divergence) that
    equals it when k is the vocabulary size, and nearly so once the top k hold almost all of p's mass. Logits
    are kept as the model gave them (float32) with the float64 log-normalizer, so the log-probabilities are
    exact and a config identical to the reference scores exactly 0.
    """

    ids: torch.Tensor  # (windows, context): the windows it was kept on (scoring other windows is an error)
    logits: torch.Tensor  # (windows, steps, k) float32, each row descending
    indices: torch.Tensor  # (windows, steps, k) int64
    logsumexp: torch.Tensor  # (windows, steps) float64


def _top_k_divergence(ref_logits: torch.Tensor, ref_indices: torch.Tensor, ref_lse: torch.Tensor,
                      logits: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: KL(p ‖ q) over {p's top-k tokens, the rest} (float64) and whether p's top token is one of
    q's most likely (ties count as agreement)."""
    log_p = ref_logits.double() - ref_lse[:, None]
    chosen = logits.gather(-1, ref_indices)
    log_q = chosen.double() - lse[:, None]
    tail_p = (-torch.expm1(torch.logsumexp(log_p, dim=-1))).clamp_min(0.0)
    tail_q = (-torch.expm1(torch.logsumexp(log_q, dim=-1))).clamp_min(torch.finfo(torch.float64).tiny)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1) + torch.xlogy(tail_p, tail_p) - torch.xlogy(tail_p, tail_q)
    return kl, chosen[:, 0] >= logits.amax(dim=-1)


def reference_options(model: torch.nn.Module, first: bool, reference: ReferenceTopK | None,
                      top_k: int) -> dict[str, Any]:
    """`decode_faithful_perplexity` options for one config of a sweep scored against the sweep's first config:
    the ``first`` keeps its top-k logits (k past the model's vocabulary keeps all of it: the exact KL), every
    later one is scored against the kept ``reference``. None for ``top_k`` 0, or when the first run kept
    nothing (it failed)."""
    if top_k <= 0 or (reference is None and not first):
        return {}
    if first:
        return {"keep_reference": min(top_k, getattr(model.config, "vocab_size", None) or top_k)}
    return {"reference": reference}


def _check_run(model, windows: TokenWindows, batch_size: int) -> None:
    """What a run needs of its arguments, said before any forward (not as a torch error from deep inside)."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers model (a torch.nn.Module with a config), got "
                        f"{type(model).__name__}; the windows (or a tokenizer with text=) come second")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (windows run at once), got {batch_size!r}")
    vocab = getattr(model.config, "vocab_size", None)
    largest = int(windows.ids.max())
    if vocab is not None and largest >= vocab:
        raise EvalInputError(f"token id {largest} is outside the model's vocabulary of {vocab}: the windows were "
                             "cut with another tokenizer than the model's")


def _check_reference(reference: ReferenceTopK, windows: TokenWindows) -> None:
    if isinstance(reference, PerplexityResult):
        raise TypeError("reference= takes the ReferenceTopK a keep_reference= run kept: pass result.reference")
    if reference.ids.shape != windows.ids.shape or not torch.equal(reference.ids, windows.ids.to(reference.ids.device)):
        raise ValueError(f"reference= was kept on other token windows ({tuple(reference.ids.shape)}) than these "
                         f"({tuple(windows.ids.shape)}): keep it with keep_reference= on the same TokenWindows")


@dataclass
class PerplexityResult:
    """Weighted sums of one evaluation and the metrics derived from them (see the module docstring)."""

    config: str
    nll_sum: float
    tokens: int
    words: int
    bytes: int
    seconds: float
    state: dict[str, Any] = field(default_factory=dict)  # per-sequence state memory; empty for the reference
    trace: dict[str, Any] | None = field(default=None, repr=False)  # first batch's precision trace, if asked
    positions: PositionBuckets | None = None  # per position bucket, if asked
    window_kl_sum: tuple[float, ...] | None = field(default=None, repr=False)  # per window, scored vs a reference
    top1_agree: int | None = None  # scored tokens whose reference top token is also this config's top token
    reference: ReferenceTopK | None = field(default=None, repr=False)  # kept for other configs, if asked
    window_nll_sum: tuple[float, ...] | None = field(default=None, repr=False)  # per window: paired differences

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll_sum / self.words) if self.words else math.nan

    @property
    def byte_perplexity(self) -> float:
        return math.exp(self.nll_sum / self.bytes) if self.bytes else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / (self.bytes * math.log(2)) if self.bytes else math.nan

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    @property
    def kl_divergence(self) -> float | None:
        """Mean KL(reference ‖ this config) per scored token, nats (`ReferenceTopK`); None without a reference."""
        return None if self.window_kl_sum is None else sum(self.window_kl_sum) / self.tokens

    @property
    def kl_stderr(self) -> float | None:
        """Standard error of `kl_divergence` over windows (tokens within a window are not independent; every
        window scores the same number of tokens); NaN with one window."""
        if self.window_kl_sum is None:
            return None
        per_window = torch.tensor(self.window_kl_sum, dtype=torch.float64) * (len(self.window_kl_sum) / self.tokens)
        return float(mean_stderr(per_window))

    @property
    def top1_agreement(self) -> float | None:
        return None if self.top1_agree is None else self.top1_agree / self.tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "perplexity": self.perplexity,
            "word_perplexity": self.word_perplexity,
            "byte_perplexity": self.byte_perplexity,
            "bits_per_byte": self.bits_per_byte,
            "nll_sum": self.nll_sum,
            "tokens": self.tokens,
            "words": self.words,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            **self.state,
            **({} if self.window_kl_sum is None else {
                "kl_divergence": self.kl_divergence, "kl_stderr": self.kl_stderr,
                "top1_agreement": self.top1_agreement}),
            **({"position_buckets": self.positions.to_dict()} if self.positions is not None else {}),
            **({} if self.window_nll_sum is None else {"window_nll_sum": list(self.window_nll_sum)}),
        }


def _windows(windows_or_tokenizer, text: str | None, context: int | None, max_tokens: int | None) -> TokenWindows:
    if isinstance(windows_or_tokenizer, TokenWindows):
        return windows_or_tokenizer
    if text is None or context is None:
        raise TypeError("pass TokenWindows, or a tokenizer together with text= and context=")
    return make_windows(windows_or_tokenizer, text, context, max_tokens)


def _check_finite(window_nll: torch.Tensor, first_window: int, label: str) -> None:
    """Raise unless every window's ΣNLL is finite (one host sync per batch).

    NaN or +Inf anywhere in a row of logits makes that token's NLL NaN/Inf (log-sum-exp propagates them), as
    does -Inf on the target; -Inf on other tokens (probability 0, e.g. masked padding ids) is legitimate.
    """
    bad = ~torch.isfinite(window_nll)
    if bool(bad.any()):
        rows = (bad.nonzero().flatten() + first_window).tolist()
        raise NonFiniteLogitsError(f"{label}: NaN/Inf next-token logits in window(s) {rows[:8]}"
                                   f"{' ...' if len(rows) > 8 else ''}; perplexity is undefined")


def _device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the first parameter not offloaded by accelerate (those wait on ``meta``; its hooks
    move inputs and outputs as needed), else the CPU."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def decode_faithful_perplexity(
    model: torch.nn.Module,
    windows_or_tokenizer,
    config: GSQConfig | str | dict = "fp32",
    *,
    text: str | None = None,
    context: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    trace: bool | str = False,
    position_buckets: Sequence[int] | None = None,
    keep_reference: int | None = None,
    reference: ReferenceTopK | None = None,
    stepped: bool | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` with its states stored per ``config`` after every token of every window.

    ``windows_or_tokenizer`` is a `TokenWindows` (share one across configs), or a tokenizer with ``text=``
    and ``context=`` (and optionally ``max_tokens=``). An unpatched model is patched with ``config`` for
    the run and restored after; an already patched one keeps its patch and gets a ``config`` cache.
    ``batch_size`` windows run at a time, each batch with a fresh `GSQCache`. ``trace=True`` (or ``"units"``)
    keeps the precision trace of the first batch (`GSQCache.precision_trace`) in ``result.trace``: per layer,
    window token and window, the fraction of units stored in the high format. ``position_buckets``
    (increasing bucket starts from 0, e.g. `log_position_buckets`) also fills ``result.positions``.
    ``keep_reference=k`` keeps this run's top-k next-token logits in ``result.reference``; another config run
    with ``reference=`` that (same windows) gets ``kl_divergence`` and ``top1_agreement`` (`ReferenceTopK`).
    ``stepped``: None steps token by token only where a chunked forward would not be faithful (see the module
    docstring), True always, False never (refused where it would not be faithful).
    """
    windows = _windows(windows_or_tokenizer, text, context, max_tokens)
    _check_run(model, windows, batch_size)
    cfg = resolve_config(config)
    stepped = needs_stepping(model, cfg, stepped)
    vocab = getattr(model.config, "vocab_size", None)
    if keep_reference is not None and not (isinstance(keep_reference, int) and keep_reference > 0
                                           and (vocab is None or keep_reference <= vocab)):
        raise ValueError(f"keep_reference= is the number of top logits kept per token, 1..{vocab or 'vocab size'}; "
                         f"got {keep_reference!r}")
    if reference is not None:
        _check_reference(reference, windows)
    device = _device(model)
    steps = windows.context - 1
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    if position_buckets is not None:
        starts, step_bucket = bucket_of_step(position_buckets, windows.context)
        step_bucket = step_bucket.to(device)
        bucket_nll, bucket_kl = [], []
    kept: list[tuple[torch.Tensor, ...]] = []
    window_nll, window_kl, top1 = [], [], torch.zeros((), dtype=torch.int64, device=device)
    reports = []
    kept_trace = None
    bar = tqdm(total=windows.scored_tokens, desc=cfg.name, unit="tok", disable=not progress, leave=False)
    start = time.perf_counter()
    with bar, torch.inference_mode(), (contextlib.nullcontext() if is_patched(model) else patched(model, cfg)):
        first = 0
        for batch in windows.ids.split(batch_size):
            batch = batch.to(device)
            cache = GSQCache(model.config, cfg, trace=trace if first == 0 else False)
            rows = batch.shape[0]
            step_nll = torch.empty(steps, rows, dtype=torch.float64, device=device)
            if keep_reference is not None:
                kept_logits = torch.empty(steps, rows, keep_reference, device=device)
                kept_indices = torch.empty(steps, rows, keep_reference, dtype=torch.int64, device=device)
                kept_lse = torch.empty(steps, rows, dtype=torch.float64, device=device)
            if reference is not None:
                ref = [part[first : first + rows].to(device).transpose(0, 1)
                       for part in (reference.logits, reference.indices, reference.logsumexp)]
                step_kl = torch.empty(steps, rows, dtype=torch.float64, device=device)
            for t, logits in next_token_logits(model, batch[:, :-1], cache, stepped):
                n = logits.shape[0]  # steps t .. t+n-1, each scoring the token after it
                logits = logits.flatten(0, 1)  # (n * rows, vocab), step-major
                step_nll[t : t + n] = F.cross_entropy(logits, batch[:, t + 1 : t + 1 + n].T.flatten(),
                                                      reduction="none").view(n, rows)
                if keep_reference is not None or reference is not None:
                    lse = torch.logsumexp(logits.double(), dim=-1)
                if keep_reference is not None:
                    top = torch.topk(logits, keep_reference, dim=-1)
                    kept_logits[t : t + n] = top.values.view(n, rows, -1)
                    kept_indices[t : t + n] = top.indices.view(n, rows, -1)
                    kept_lse[t : t + n] = lse.view(n, rows)
                if reference is not None:
                    kl, agree = _top_k_divergence(*(part[t : t + n].flatten(0, 1) for part in ref), logits, lse)
                    step_kl[t : t + n] = kl.view(n, rows)
                    top1 += agree.sum()
                bar.update(rows * n)
            nll = step_nll.sum(dim=0)
            _check_finite(nll, first, cfg.name)
            nll_sum += nll.sum()
            window_nll.append(nll)
            if keep_reference is not None:
                kept.append(tuple(part.transpose(0, 1).cpu() for part in (kept_logits, kept_indices, kept_lse)))
            if reference is not None:
                window_kl.append(step_kl.sum(dim=0))
            if position_buckets is not None:
                buckets = step_nll.new_zeros(len(starts), rows)
                bucket_nll.append(buckets.index_add_(0, step_bucket, step_nll))
                if reference is not None:
                    buckets = step_kl.new_zeros(len(starts), rows)
                    bucket_kl.append(buckets.index_add_(0, step_bucket, step_kl))
            reports.append(cache.memory_report())
            if trace and first == 0:
                kept_trace = cache.precision_trace()
            first += batch.shape[0]
        total = float(nll_sum)
    positions = None
    if position_buckets is not None:
        per_window = torch.cat(bucket_nll, dim=1).T.cpu()  # (windows, buckets)
        kl_per_window = torch.cat(bucket_kl, dim=1).T.cpu().tolist() if reference is not None else None
        counts = torch.bincount(step_bucket.cpu(), minlength=len(starts)) * windows.ids.shape[0]
        positions = PositionBuckets(starts, (*starts[1:], windows.context), tuple(per_window.sum(dim=0).tolist()),
                                    tuple(counts.tolist()), tuple(map(tuple, per_window.tolist())),
                                    None if kl_per_window is None else tuple(map(tuple, kl_per_window)))
    kept_reference = None
    if keep_reference is not None:
        logits, indices, lse = (torch.cat(parts) for parts in zip(*kept, strict=True))
        kept_reference = ReferenceTopK(windows.ids, logits, indices, lse)
    return PerplexityResult(cfg.name, total, windows.scored_tokens, int(windows.words.sum()),
                            int(windows.bytes.sum()), time.perf_counter() - start,
                            {"policy": cfg.policy.kind, "evaluation": "stepped" if stepped else "chunked",
                             **_state_summary(reports)}, kept_trace, positions,
                            tuple(torch.cat(window_kl).tolist()) if reference is not None else None,
                            int(top1) if reference is not None else None, kept_reference,
                            tuple(torch.cat(window_nll).tolist()))


def _state_summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-sequence state memory over all batches (each report covers one batch of windows).

    Sizes are divided by the batch size and the largest batch value is kept (batches differ only when a
    non-finite state forced an fp32 fallback copy); bits and format fractions are averaged over windows.
    """
    rows = [report["batch_size"] for report in reports]
    total = sum(rows)
    sizes = ("state_bytes", "full_precision_state_bytes", "ssm_state_bytes", "full_precision_ssm_state_bytes")
    summary: dict[str, Any] = {key: max(r[key] / n for r, n in zip(reports, rows, strict=True)) for key in sizes}
    summary["avg_state_bits"] = sum(r["avg_state_bits"] * n for r, n in zip(reports, rows, strict=True)) / total
    names = {name for r in reports for name in r["format_fractions"]}
    summary["format_fractions"] = {
        name: sum(r["format_fractions"].get(name, 0.0) * n for r, n in zip(reports, rows, strict=True)) / total
        for name in sorted(names)
    }
    summary["nonfinite_unit_writes"] = sum(r["nonfinite_unit_writes"] for r in reports)
    return summary


def full_sequence_perplexity(
    model: torch.nn.Module,
    windows_or_tokenizer,
    *,
    text: str | None = None,
    context: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityResult:
    """The reference: one ordinary forward per batch of windows, no cache, the model's own kernels.

    Scores exactly the tokens `decode_faithful_perplexity` scores; with the ``fp32`` config the two agree
    to float rounding. Pass the unpatched model: a patched one stores its states per its config inside the
    forward too (every forward of a patched model does).
    """
    windows = _windows(windows_or_tokenizer, text, context, max_tokens)
    _check_run(model, windows, batch_size)
    device = _device(model)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    start = time.perf_counter()
    with torch.inference_mode():
        first = 0
        for batch in tqdm(windows.ids.split(batch_size), desc="reference", disable=not progress, leave=False):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
            nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").double().sum(dim=1)
            _check_finite(nll, first, "reference")
            nll_sum += nll.sum()
            first += batch.shape[0]
        total = float(nll_sum)
    return PerplexityResult("reference", total, windows.scored_tokens, int(windows.words.sum()),
                            int(windows.bytes.sum()), time.perf_counter() - start)
