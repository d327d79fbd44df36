"""Self-speculative decoding: the same weights draft with a low-precision state and verify with the target's.

Only the states are duplicated (two `GSQCache` objects over one model), never the weights. Each round:

1. the draft starts from its own state (``draft_sync="once"``, the default: it took the target's state, re-stored
   in its formats, after the prompt only; a row goes back to its own state before the last token it kept and
   absorbs that token and the pending one in one forward), or from the target's committed state re-stored
   (``"every_round"``; ``"rejection"``: after a round in which a row rejected, else its own);
2. the draft proposes up to ``lookahead`` tokens one at a time, stopping early when its own normalized
   next-token entropy exceeds ``entropy_threshold`` (uncertain steps go to the full-precision state);
3. the target scores the pending token and all proposals in one multi-token forward from its committed
   state, keeping per token either a checkpoint of its states (``rollback="checkpoints"``,
   ``GSQCache.record_positions``) or the scan's inputs (``rollback="replay"``, ``GSQCache.record_inputs``);
4. greedy: proposals are accepted while they equal the target's argmax; sampling: proposal ``d`` is
   accepted with probability ``min(1, p(d)/q(d))`` and a rejection resamples from ``max(0, p - q)``
   normalized, so the output distribution is the target's (Leviathan et al., 2023);
5. the target goes to the state after the accepted tokens: it picks that checkpoint (``GSQCache.rollback``),
   replays the kept inputs of the accepted tokens from its committed state (``GSQCache.replay``: one short
   scan, no weights), or, with ``rollback="recompute"``, restores its committed state and re-feeds the
   accepted tokens through the model; attention KV of hybrids is cropped.

Exactness comes from the verification alone: the draft only proposes, so its state may drift from the target's.
Rows of a batch accept different numbers of tokens: acceptance is decided per row and each row is committed
at its own prefix (per-row counts to ``rollback``/``replay``; left-padded prompts with ``attention_mask``). On a
hybrid the attention KV of each row is right-aligned after each round (`GSQCache.rollback`), its left padding in
the mask extended, and every forward gets each row's own ``position_ids`` (`_KVRows`). Greedy output equals plain
greedy ``generate`` with the target's state config, row by row (the target writes its state after every token in
both).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .cache import GSQCache
from .config import GSQConfig, resolve_config
from .errors import GSQConfigError
from .patch import is_patched, patch, unpatch
from .replay import replay_read_nbytes
from .signals import reads_logits
from .store import select_rows

__all__ = ["SpeculativeOutput", "SpeculativeStats", "speculative_generate"]

ROLLBACKS = ("checkpoints", "recompute", "replay")
DRAFT_SYNCS = ("once", "rejection", "every_round")


@dataclass
class SpeculativeStats:
    """Counters of one `speculative_generate` call, and the state bytes it moved by kind.

    Bytes count what crosses memory in a fused implementation, the convention of `GSQCache.memory_report()`'s
    ``state_bytes_per_step`` (one decode step reads the state and writes it, each unit in its own format, SSM +
    conv): a forward reads the state it starts from once and writes the state it leaves once (the round trips of
    ``every_step`` writes inside a multi-token forward stay on chip); one read or one write is half a step's
    bytes. The prompt's prefill is not counted (nor is it in ``plain_step_bytes``, plain decoding's bytes per
    token).
    """

    generated: int = 0
    drafted: int = 0
    accepted: int = 0
    draft_steps: int = 0
    draft_syncs: int = 0  # times the draft took the target's committed state (re-stored in its formats)
    verify_steps: int = 0
    row_verifies: int = 0  # verify steps times the rows still generating in them (verify_steps at batch 1)
    rollbacks: int = 0  # verifications that rejected a proposal: the target went back to an earlier state
    recommitted_tokens: int = 0  # tokens re-fed (recompute) or replayed (replay) by those rollbacks
    draft_state_bytes: float = 0  # the draft's state, in its formats: each draft step, the write of each sync
    target_state_bytes: float = 0  # the target's: the read of each sync, each verify, each recompute or replay
    checkpoint_bytes: float = 0  # checkpoints: the per-token states a verify writes beyond the one it leaves
    replay_write_bytes: float = 0  # replay: the per-token scan inputs a verify keeps (activations it makes anyway)
    replay_read_bytes: float = 0  # replay: those a replay reads back (`gsq_hf.replay.replay_read_nbytes`)
    plain_step_bytes: int = 0  # plain decoding with the target's state, per token (its state_bytes_per_step)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_per_verify(self) -> float:
        return self.accepted / self.row_verifies if self.row_verifies else 0.0

    @property
    def state_bytes_moved(self) -> float:
        return (self.draft_state_bytes + self.target_state_bytes + self.checkpoint_bytes + self.replay_write_bytes
                + self.replay_read_bytes)

    @property
    def state_bytes_per_token(self) -> float:
        return self.state_bytes_moved / self.generated if self.generated else 0.0

    @property
    def state_bytes_vs_plain(self) -> float:
        """State bytes per generated token over plain decoding's (below 1: fewer bytes than plain decoding)."""
        return self.state_bytes_per_token / self.plain_step_bytes if self.plain_step_bytes else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {name: getattr(self, name) for name in (
            "acceptance_rate", "mean_accepted_per_verify", "state_bytes_moved", "state_bytes_per_token",
            "state_bytes_vs_plain")}


@dataclass
class SpeculativeOutput:
    sequences: torch.Tensor  # (batch, prompt + generated), rows padded after their eos as generate pads them
    stats: SpeculativeStats


def _min_bits(config: GSQConfig) -> int:
    return min(f.bits for f in config.build_policy().formats)


def _check(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, target: GSQConfig,
           draft: GSQConfig, lookahead: int, max_new_tokens: int, rollback: str, draft_sync: str) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(lookahead, int) or lookahead < 1:
        raise ValueError(f"lookahead must be an integer >= 1, got {lookahead!r}")
    if rollback not in ROLLBACKS:
        raise ValueError(f"rollback must be one of {', '.join(ROLLBACKS)}, got {rollback!r}")
    if draft_sync not in DRAFT_SYNCS:
        raise ValueError(f"draft_sync must be one of {', '.join(DRAFT_SYNCS)}, got {draft_sync!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"speculative_generate takes input_ids of shape (batch, length), got {tuple(input_ids.shape)}")
    if attention_mask is not None and (attention_mask.shape != input_ids.shape
                                       or not bool(attention_mask[:, -1].all())):
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)} and its last column set "
                         f"(left padding), got shape {tuple(attention_mask.shape)} with last column "
                         f"{attention_mask[:, -1].tolist()}")
    if _min_bits(draft) >= _min_bits(target):
        raise GSQConfigError(
            f"the draft state ({draft.name}: lowest format {_min_bits(draft)} bits) must be lower precision than "
            f"the target's ({target.name}: {_min_bits(target)} bits); e.g. draft='int4' or 'int8' over an fp32 target"
        )
    if draft_sync == "once" and draft.write_mode != "every_step":
        raise GSQConfigError(f"draft_sync='once' needs a draft that writes its state after every token "
                             f"(write_mode='every_step'; {draft.name} has {draft.write_mode!r}): a row that rejects "
                             "goes back to the draft's own state after the tokens it kept; or draft_sync='every_round'")
    if target.write_mode != "every_step" or reads_logits(target.build_policy()):
        raise GSQConfigError(
            "the target must write its state after every token with a signal known inside a forward "
            "(write_mode='every_step', a policy that reads no next-token signal) for verification to equal plain "
            "decoding"
        )


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


def _step_bytes(cache: GSQCache) -> int:
    """What the last decode step read and wrote (`GSQCache.memory_report`'s ``state_bytes_per_step``)."""
    return sum(layer.memory()["state_bytes_per_step"] for layer in cache.gsq_layers)


def _io_bytes(cache: GSQCache) -> int:
    """What one read, or one write, of the current state moves."""
    return sum(layer.io_bytes for layer in cache.gsq_layers)


def _ssm_bytes_written(cache: GSQCache) -> float:
    """SSM bytes written so far, every write counted (each unit in its own format)."""
    return sum(float(layer.stored_bits) for layer in cache.gsq_layers) / 8


class _KVRows:
    """Per-row bookkeeping of a hybrid's attention over a batch: the mask of the target's KV entries (the prompts'
    left padding, grown by each round's per-row rollback, `GSQCache.rollback`) and each row's position of its
    pending token (``generate``'s: the number of real tokens before it)."""

    def __init__(self, attention_mask: torch.Tensor):
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        self.held = attention_mask[:, :-1]
        self.prompt_positions, self.pending = positions[:, :-1], positions[:, -1]

    def inputs(self, held: torch.Tensor, first: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
        """A forward's ``attention_mask`` and ``position_ids`` for ``length`` new tokens over KV entries ``held``,
        row r's first at position ``first[r]``."""
        return {"attention_mask": torch.cat([held, held.new_ones(held.shape[0], length)], dim=1),
                "position_ids": first[:, None] + torch.arange(length, device=first.device)}

    def commit(self, kept: torch.Tensor) -> None:
        """Row r kept its first ``kept[r]`` verified tokens, right-aligned: its left padding grew by max - kept[r]."""
        most = int(kept.max())
        full = torch.cat([self.held, self.held.new_ones(self.held.shape[0], most)], dim=1)
        source = torch.arange(full.shape[1], device=kept.device) - (most - kept)[:, None]
        self.held = full.gather(1, source.clamp_min(0)) * (source >= 0)
        self.pending = self.pending + kept


def _share_attention_kv(draft_cache: GSQCache, target_cache: GSQCache, drop_last: int) -> None:
    """The draft attends over the target's keys and values (references: an update concatenates into new tensors)
    but their last ``drop_last`` entries, the tokens it absorbs again."""
    for mine, theirs in zip(draft_cache.attention_layers(), target_cache.attention_layers(), strict=True):
        if theirs.is_initialized:
            mine.keys, mine.values = theirs.keys[..., :-drop_last, :], theirs.values[..., :-drop_last, :]
            mine.is_initialized = True
            mine.dtype, mine.device = getattr(theirs, "dtype", None), getattr(theirs, "device", None)


@torch.no_grad()
def speculative_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    draft: GSQConfig | str | dict = "int4",
    lookahead: int = 8,
    max_new_tokens: int = 64,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    entropy_threshold: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    rollback: str = "replay",
    draft_sync: str = "once",
    generator: torch.Generator | None = None,
) -> SpeculativeOutput:
    """Generate with a low-precision-state draft of ``model`` itself and exact verification.

    The target state config is the one ``model`` is patched with (fp32 if it is not patched: lossless in an fp32
    model, up to bf16 rounding in a bf16 one, as `gsq_hf.patch`'s fp32).
    A row stops at ``eos_token_id`` and is then filled with ``pad_token_id`` (defaults: the model's generation
    config), like ``generate``; rows of a batch accept different numbers of tokens and each is committed at its
    own. ``attention_mask`` marks the left padding of a batch of prompts of different lengths. ``draft_sync``:
    when the draft takes the target's state (``"once"``, ``"rejection"``, ``"every_round"``; module docstring).
    """
    generation_config = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(generation_config, "eos_token_id", None)
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if pad_token_id is None:
        pad_token_id = getattr(generation_config, "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    was_patched = is_patched(model)
    target = model._gsq_patch.config if was_patched else resolve_config("fp32")
    draft = resolve_config(draft)
    _check(model, input_ids, attention_mask, target, draft, lookahead, max_new_tokens, rollback, draft_sync)
    if not was_patched:
        patch(model, target)
    try:
        return _generate(model, input_ids, attention_mask, target, draft, lookahead, max_new_tokens, do_sample,
                         temperature, entropy_threshold, eos_ids, pad_token_id, rollback, draft_sync, generator)
    finally:
        if not was_patched:
            unpatch(model)


def _generate(model, input_ids, attention_mask, target, draft, lookahead, max_new_tokens, do_sample, temperature,
              entropy_threshold, eos_ids, pad_token_id, rollback, draft_sync, generator) -> SpeculativeOutput:
    stats = SpeculativeStats()
    target_cache, draft_cache = GSQCache(model.config, target), GSQCache(model.config, draft)
    batch, device = input_ids.shape[0], input_ids.device
    rows_kv = _KVRows(attention_mask if attention_mask is not None else torch.ones_like(input_ids)) \
        if target_cache.has_attention_kv else None
    if input_ids.shape[1] > 1:
        if rows_kv is not None:
            prefill = {"attention_mask": rows_kv.held, "position_ids": rows_kv.prompt_positions}
        else:
            prefill = {"attention_mask": None if attention_mask is None else attention_mask[:, :-1]}
        model(input_ids[:, :-1], cache=target_cache, **prefill)
    pending = input_ids[:, -1:]
    rows = torch.arange(batch, device=device)
    out = torch.full((batch, max_new_tokens + 2 * lookahead + 2), pad_token_id, dtype=input_ids.dtype, device=device)
    count = torch.zeros(batch, dtype=torch.long, device=device)  # tokens generated per row (may run past the end)
    eos = torch.tensor(eos_ids, dtype=input_ids.dtype, device=device)
    log_vocab = None
    draft_states = accepted = rejected = absorbed = None
    while True:
        written = torch.arange(max_new_tokens, device=device) < count[:, None]
        finished = torch.isin(out[:, :max_new_tokens], eos) & written
        active = ~finished.any(1) & (count < max_new_tokens)
        if not bool(active.any()):
            break
        continuing = draft_states is not None and (
            draft_sync == "once" or (draft_sync == "rejection" and not bool(rejected[active].any())))
        if continuing:  # each row back to its own state before the last token it kept, which it absorbs again
            for layer, states in zip(draft_cache.gsq_layers, draft_states, strict=True):
                layer.storage = select_rows(states, accepted)
            _share_attention_kv(draft_cache, target_cache, drop_last=1)
            token = torch.cat([absorbed[rows, accepted][:, None], pending], dim=1)
            draft_held = None if rows_kv is None else rows_kv.held[:, :-1]
            # the state between the two: where a row that accepts none goes back
            draft_cache.record_positions(draft_sync == "once")
        else:
            if target_cache.gsq_layers[0].has_state:
                draft_cache.load_states(target_cache)
                stats.draft_syncs += 1
                stats.target_state_bytes += _io_bytes(target_cache)  # read
                stats.draft_state_bytes += _io_bytes(draft_cache)  # write
            token = pending
            draft_held = None if rows_kv is None else rows_kv.held
        draft_states = [[layer.storage] for layer in draft_cache.gsq_layers]  # per layer: before each draft forward
        committed = target_cache.snapshot()
        proposals, draft_probs = [], []
        valid = torch.zeros(batch, dtype=torch.long, device=device)  # proposals per row up to its entropy stop
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        for _ in range(min(lookahead, int((max_new_tokens - count[active]).max()))):
            # the draft holds the target's KV entries and its own since (one fewer at first when continuing)
            first = None if rows_kv is None else rows_kv.pending + draft_held.shape[1] - rows_kv.held.shape[1]
            inputs = {} if rows_kv is None else rows_kv.inputs(draft_held, first, token.shape[1])
            logits = model(token, cache=draft_cache, **inputs).logits[:, -1]
            draft_held = inputs.get("attention_mask")
            stats.draft_steps += 1
            stats.draft_state_bytes += _step_bytes(draft_cache)
            for layer, states in zip(draft_cache.gsq_layers, draft_states, strict=True):
                if draft_cache.recording:  # the checkpoint after the re-absorbed token, written beside the state
                    states[-1] = layer.positions[0]
                states.append(layer.storage)
            if draft_cache.recording:
                stats.draft_state_bytes += _io_bytes(draft_cache)
                draft_cache.record_positions(False)
            q = _probs(logits, temperature)
            token = torch.multinomial(q, 1, generator=generator) if do_sample else q.argmax(-1, keepdim=True)
            proposals.append(token)
            draft_probs.append(q)
            valid += (~stopped).long()
            if entropy_threshold is not None:
                log_vocab = log_vocab or math.log(q.shape[-1])
                stopped |= -(q * q.clamp_min(1e-30).log()).sum(-1) / log_vocab > entropy_threshold
                if bool(stopped.all()):
                    break
        stats.drafted += int(valid[active].sum())

        target_cache.record_positions(rollback == "checkpoints")
        target_cache.record_inputs(rollback == "replay")
        committed_bytes, written_before = _io_bytes(target_cache), _ssm_bytes_written(target_cache)
        verified = len(proposals) + 1
        inputs = {} if rows_kv is None else rows_kv.inputs(rows_kv.held, rows_kv.pending, verified)
        verify = model(torch.cat([pending, *proposals], dim=1), cache=target_cache, **inputs).logits  # (batch, k+1, V)
        stats.verify_steps += 1
        stats.plain_step_bytes = _step_bytes(target_cache) // batch
        last_bytes = _io_bytes(target_cache)
        stats.target_state_bytes += committed_bytes + last_bytes  # the committed state read, the last one written
        if rollback == "checkpoints":  # every token's SSM state and conv window written, but the last
            conv_bytes = sum(layer.storage.conv_nbytes for layer in target_cache.gsq_layers)
            stats.checkpoint_bytes += (_ssm_bytes_written(target_cache) - written_before - last_bytes
                                       + (len(proposals) + 1) * conv_bytes)
        stats.replay_write_bytes += target_cache.recorded_input_bytes  # 0 unless recording inputs
        absorbed = torch.cat([pending, *proposals], dim=1)  # what the target verified: (batch, k + 1)
        proposed = absorbed[:, 1:]  # (batch, k)
        accepted, next_token = _accept(_probs(verify, temperature), proposed, torch.stack(draft_probs, 1), valid,
                                       do_sample, generator)
        stats.accepted += int(accepted[active].sum())
        stats.row_verifies += int(active.sum())
        rejected = accepted < len(proposals)
        if bool(rejected.any()):  # each row to the state after its pending token and its accepted proposals
            stats.rollbacks += int(rejected.sum())
            kept = accepted + 1
            if rollback == "checkpoints":
                target_cache.rollback(kept)
            else:
                if rollback == "replay":  # reads back the inputs of the tokens it replays
                    stats.replay_read_bytes += sum(replay_read_nbytes(layer, kept[rejected])
                                                   for layer in target_cache.gsq_layers)
                    target_cache.replay(kept)
                else:
                    target_cache.restore(committed)
                    target_cache.record_positions(True)
                    refed = int(accepted.max()) + 1
                    inputs = {} if rows_kv is None else rows_kv.inputs(rows_kv.held, rows_kv.pending, refed)
                    model(torch.cat([pending, *proposals[: refed - 1]], dim=1), cache=target_cache, **inputs)
                    target_cache.rollback(kept)
                stats.recommitted_tokens += int(kept[rejected].sum())
                # the rejected rows' committed states read and new ones written
                stats.target_state_bytes += (committed_bytes + _io_bytes(target_cache)) * int(rejected.sum()) / batch
        target_cache.record_positions(False)
        target_cache.record_inputs(False)
        if rows_kv is not None:
            rows_kv.commit(accepted + 1)

        new_tokens = torch.cat([proposed, next_token], dim=1)  # row r's output: its accepted, then its next token
        new_tokens[rows, accepted] = next_token[:, 0]  # (what follows is overwritten by the next round)
        out[rows[:, None], count[:, None] + torch.arange(new_tokens.shape[1], device=device)] = new_tokens
        count += (accepted + 1) * active  # a finished row's count stays: its later tokens are never read
        pending = next_token
    out = out[:, :max_new_tokens]
    is_eos = torch.isin(out, eos).long()
    ended = is_eos.cumsum(1)
    out = out.masked_fill(ended - is_eos > 0, pad_token_id)  # after a row's eos: padding, as generate pads
    lengths = torch.where(ended[:, -1] > 0, (ended == 0).sum(1) + 1, max_new_tokens)
    stats.generated = int(lengths.sum())
    return SpeculativeOutput(torch.cat([input_ids, out[:, : int(lengths.max())]], dim=1), stats)


def _accept(p: torch.Tensor, proposals: torch.Tensor, q: torch.Tensor, valid: torch.Tensor, do_sample: bool,
            generator) -> tuple[torch.Tensor, torch.Tensor]:
    """How many proposals each row accepts, (batch,), and the token it emits after them, (batch, 1).

    ``p`` (batch, k + 1, V) is the target's distribution before each proposal and after the last one, ``q``
    (batch, k, V) the draft's; row r proposed ``valid[r]`` tokens (the rest of its k are ignored).
    """
    batch, k = proposals.shape
    rows = torch.arange(batch, device=p.device)
    in_time = torch.arange(k, device=p.device) < valid[:, None]
    if not do_sample:
        best = p.argmax(-1)  # (batch, k + 1)
        accepted = ((best[:, :k] == proposals) & in_time).long().cumprod(1).sum(1)
        return accepted, best[rows, accepted][:, None]
    p_d = p[:, :k].gather(-1, proposals[..., None])[..., 0]
    q_d = q.gather(-1, proposals[..., None])[..., 0]
    ratio = (p_d / q_d.clamp_min(1e-30)).clamp(max=1.0)
    draws = torch.rand((batch, k), generator=generator, device=p.device)
    accepted = ((draws < ratio) & in_time).long().cumprod(1).sum(1)
    p_next, q_next = p[rows, accepted], q[rows, accepted.clamp(max=k - 1)]
    residual = (p_next - q_next).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_next)
    rejected = (accepted < valid)[:, None]  # a rejection resamples from the residual, else the target's next
    return accepted, torch.multinomial(torch.where(rejected, residual, p_next), 1, generator=generator)
