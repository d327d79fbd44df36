"""`patch` / `unpatch`: instance-scoped changes to one model, undone exactly.

``patch(model, config)``
  * replaces ``forward`` on each Mamba-family mixer *instance* with its adapter's step (the original
    bound method is kept; nothing in transformers is monkeypatched, other models are untouched);
  * registers a forward pre-hook on the model that gives every cached forward a `GSQCache` (also the
    one ``generate`` starts) and a forward without one (``use_cache=False``, train mode) a scratch cache
    dropped after it, so every forward of a patched model stores its states per the config; and a forward
    hook on the LM head that records the next-token signal for entropy policies;
  * stores the config in ``model.config.gsq_config`` so that ``save_pretrained`` saves it.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, LinearAttentionLayer

from . import _compat
from .adapters import ADAPTERS, MixerAdapter, find_adapter
from .adapters.unsupported import find_refusal
from .cache import GSQCache
from .config import GSQConfig, resolve_config, saved_config
from .errors import GSQConfigError, NotPatchedError, UnsupportedModelError
from .formats import get_format
from .signals import reads_logits

__all__ = ["from_pretrained", "is_patched", "patch", "patched", "unpatch"]

DEFAULT_PRESET = "gsq-gate"


@dataclass
class _PatchState:
    config: GSQConfig
    mixers: list[tuple[nn.Module, str, Any]] = field(default_factory=list)  # (mixer, attr, previous value)
    handles: list[Any] = field(default_factory=list)
    active_cache: GSQCache | None = None
    scratch_cache: GSQCache | None = None  # this forward's states when the caller keeps none (use_cache=False)
    takes_position_ids: bool = False
    training_warning_due: bool = False  # a lossy config, not yet warned that a training forward goes through it
    had_gsq_config: bool = False
    previous_gsq_config: Any = None


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "_gsq_patch", None) is not None


def _supported_families() -> str:
    return ", ".join(f"{name} ({'/'.join(cls.mixer_classes)})" for name, cls in ADAPTERS.items())


def _refuse_non_mamba_states(model: nn.Module) -> None:
    """Raise if ``model`` holds a recurrent layer whose state is not a Mamba SSM state (see adapters.unsupported)."""
    found = [(entry, type(m).__name__) for m in model.modules() if (entry := find_refusal(m)) is not None]
    if found:
        entry = found[0][0]
        names = ", ".join(sorted({name for other, name in found if other is entry}))
        raise UnsupportedModelError(
            f"{entry.kind} layers ({names}) are not a Mamba SSM state: {entry.reason}; "
            f"supported families: {_supported_families()}"
        )


def patchable_mixers(model: nn.Module) -> list[tuple[nn.Module, MixerAdapter]]:
    """The mixers `patch` takes over, with their adapters; `UnsupportedModelError` when the model has none.

    Reads module types only, so it also runs on a model built on the ``meta`` device from its config: the
    CLI refuses an unsupported model before reading its tokenizer or weights.
    """
    _refuse_non_mamba_states(model)
    mixers = [(module, adapter) for module in model.modules() if (adapter := find_adapter(module)) is not None]
    if not mixers:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) has no Mamba-family mixer gsq_hf can patch; "
            f"supported families: {_supported_families()}"
        )
    return mixers


def _validate(model_config: GSQConfig, model: nn.Module, mixers: list[tuple[nn.Module, MixerAdapter]]) -> None:
    model_config.check_layer_indices([mixer.layer_idx for mixer, _ in mixers], type(model).__name__)
    for mixer, adapter in mixers:
        config = model_config.for_layer(mixer.layer_idx)
        where = f" (layer {mixer.layer_idx})" if config is not model_config else ""
        n = adapter.d_state(mixer)
        group = config.group_size or n
        if n % group:
            raise GSQConfigError(f"GSQConfig.group_size={group}{where} does not divide d_state={n}; use a divisor "
                                 f"of {n}")
        for fmt in config.build_policy().formats:
            if fmt.rotation is not None and (n < 2 or n & (n - 1)):
                raise GSQConfigError(f"{fmt.name}{where} rotates along d_state, which must be a power of two; "
                                     f"d_state={n}: use a format without -hadamard")
            if n % fmt.codes_per_block:
                raise GSQConfigError(f"{fmt.name}{where} packs {fmt.codes_per_block} codes per block along "
                                     f"d_state: d_state={n} is not a multiple; use a format of 4 or 8 bits (1-2 codes "
                                     "per block)")
        width = mixer.conv1d.kernel_size[0]
        if config.conv_format != "auto" and width % get_format(config.conv_format).codes_per_block:
            raise GSQConfigError(f"GSQConfig.conv_format={config.conv_format!r}{where} packs "
                                 f"{get_format(config.conv_format).codes_per_block} codes per block; the conv "
                                 f"window of {width} values is not a multiple (use int8, int4, fp8, fp16 or fp32)")
        if reads_logits(config.build_policy()) and model.get_output_embeddings() is None:
            raise GSQConfigError(
                f"the {config.policy.kind} policy{where} reads the model's next-token logits, but "
                f"{type(model).__name__} has no LM head; patch the *ForCausalLM model instead"
            )


def _make_forward(adapter: MixerAdapter, mixer: nn.Module, original, state: _PatchState):
    def forward(hidden_states: torch.Tensor, *args, attention_mask: torch.Tensor | None = None, **kwargs):
        cache = _compat.pop_cache_kwarg(kwargs)
        if cache is None and args:
            cache, args = args[0], args[1:]
        if state.scratch_cache is not None and not isinstance(cache, GSQCache):
            # use_cache=False or train mode: the caller keeps no state (a hybrid may still build its own KV
            # cache); the SSM states still go through the config, into a cache dropped after this forward
            cache = state.scratch_cache
        if cache is None:  # the mixer called on its own, outside the patched model's forward
            return original(hidden_states, *args, attention_mask=attention_mask, **kwargs)
        if kwargs.get("seq_idx") is not None:
            raise ValueError(
                "packed sequences (seq_idx) are not supported with a state cache: the recurrent state would flow "
                "from one sequence into the next; pass a padded batch with an attention_mask instead"
            )
        if not isinstance(cache, GSQCache):
            raise TypeError(
                f"a gsq_hf-patched model keeps its states in a GSQCache, got {type(cache).__name__}; pass no cache "
                "(one is created) or gsq_hf.GSQCache(model, config)"
            )
        return adapter.forward(mixer, hidden_states, cache.gsq_layer(mixer.layer_idx), attention_mask)

    return forward


def _is_fresh_cache(cache: Cache) -> bool:
    """A plain transformers cache with no state yet (as ``generate`` creates): safe to replace."""
    return not any(
        isinstance(layer, LinearAttentionLayer) and any(layer.has_previous_state.values()) for layer in cache.layers
    )


def _pre_forward_hook(model: nn.Module, args: tuple, kwargs: dict):
    state: _PatchState = model._gsq_patch
    cache = next((kwargs[name] for name in _compat.CACHE_KWARG_ALIASES if kwargs.get(name) is not None), None)
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = bool(getattr(model.config, "use_cache", True)) and not model.training
    if cache is None and use_cache or (
        cache is not None and not isinstance(cache, GSQCache) and _is_fresh_cache(cache)
    ):
        cache = GSQCache(model, state.config)
    elif cache is not None and not isinstance(cache, GSQCache):
        raise TypeError(
            f"this {type(cache).__name__} already holds states written by an unpatched model; a patched model "
            "continues only from a GSQCache. Start from no cache, or pass gsq_hf.GSQCache(model, config)."
        )
    if isinstance(cache, GSQCache):  # under the current name, whichever alias the caller used
        for name in _compat.CACHE_KWARG_ALIASES:
            kwargs.pop(name, None)
        kwargs[_compat.CACHE_KWARG] = cache
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        input_ids = input_ids if isinstance(input_ids, torch.Tensor) else None
        cache.begin_forward(input_ids)
        _continue_positions(model, cache, input_ids, kwargs)
    state.scratch_cache = GSQCache(model, state.config) if cache is None else None
    state.active_cache = cache if cache is not None else state.scratch_cache
    if state.training_warning_due and model.training and torch.is_grad_enabled():
        state.training_warning_due = False
        warnings.warn(f"gsq_hf: training through the {state.config.name!r} state: no gradient flows back through "
                      "a stored (rounded) state, so those of A_log, Δ and the projections before the scan differ from "
                      "the unpatched model's (fp32 gives the same ones; gsq_hf.unpatch to train)", UserWarning,
                      stacklevel=2)
    return args, kwargs


def _post_forward_hook(model: nn.Module, args: tuple, output: Any) -> None:
    state: _PatchState = model._gsq_patch
    state.scratch_cache = None  # a forward without a cache keeps no state past its own end
    cache = state.active_cache
    if cache is not None and cache.static and not cache.defer_finite_check:
        cache.check_finite()  # a static cache flags NaN/Inf states on the device: one read per forward


def _continue_positions(model: nn.Module, cache: GSQCache, input_ids: torch.Tensor | None, kwargs: dict) -> None:
    """Give attention layers of a hybrid the positions after the cached tokens when the caller gave none.

    Most hybrids derive them from the cache themselves; Bamba restarts at 0 on every call, which breaks any
    cached forward outside ``generate`` (which passes positions), e.g. token-by-token evaluation.
    """
    if kwargs.get("position_ids") is not None or input_ids is None or not model._gsq_patch.takes_position_ids:
        return
    attention = cache.attention_layers()
    if attention:
        past = attention[0].get_seq_length()
        kwargs["position_ids"] = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]


def _lm_head_hook(model: nn.Module):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        cache = model._gsq_patch.active_cache
        if cache is not None and output.dim() == 3:
            cache.observe_logits(output[:, -1])

    return hook


def patch(model: nn.Module, config: GSQConfig | str | Path | dict | None = None) -> nn.Module:
    """Keep ``model``'s Mamba states in a quantized `GSQCache` per ``config`` (in place; returns ``model``).

    ``config`` is a `GSQConfig`, a preset name (see ``gsq_hf.list_presets()``), a YAML/JSON path or a
    dict. ``None`` takes the config saved with the model (``config.gsq_config``), else ``"gsq-gate"``.
    """
    _compat.check_transformers_version()
    if is_patched(model):
        raise RuntimeError("this model is already patched by gsq_hf; call gsq_hf.unpatch(model) before patching again")
    saved = getattr(getattr(model, "config", None), "gsq_config", None)
    config = resolve_config(config if config is not None else (saved or DEFAULT_PRESET))
    mixers = patchable_mixers(model)
    _validate(config.for_model_type(getattr(model.config, "model_type", None)), model, mixers)

    state = _PatchState(config=config, training_warning_due=not config.is_lossless,
                        takes_position_ids="position_ids" in inspect.signature(model.forward).parameters)
    for mixer, adapter in mixers:
        # accelerate's hooks wrap `forward` and call `_old_forward`: replace the inner call, keep the hook.
        attr = "_old_forward" if hasattr(mixer, "_hf_hook") and hasattr(mixer, "_old_forward") else "forward"
        previous = mixer.__dict__.get(attr, inspect.Parameter.empty)
        setattr(mixer, attr, _make_forward(adapter, mixer, getattr(mixer, attr), state))
        mixer.__deepcopy__ = _refuse_mixer_deepcopy  # a copy of the closure would run this mixer's weights
        state.mixers.append((mixer, attr, previous))
    state.handles.append(model.register_forward_pre_hook(_pre_forward_hook, with_kwargs=True))
    state.handles.append(model.register_forward_hook(_post_forward_hook))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        state.handles.append(head.register_forward_hook(_lm_head_hook(model)))
    state.had_gsq_config = hasattr(model.config, "gsq_config")
    state.previous_gsq_config = saved
    model.config.gsq_config = config.to_dict()
    model._gsq_patch = state
    model.__deepcopy__ = types.MethodType(_deepcopy_patched, model)  # copy.deepcopy looks it up on the instance
    return model


def _deepcopy_patched(model: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a patched model: a copy of the unpatched model, patched with the same config (a copy
    of the patch itself would keep closures over the original's mixers, computing with its weights)."""
    config = model._gsq_patch.config
    unpatch(model)
    try:
        twin = copy.deepcopy(model, memo)
    finally:
        patch(model, config)
    return patch(twin, config)


def _refuse_mixer_deepcopy(memo: dict) -> None:
    raise TypeError("a mixer of a gsq_hf-patched model cannot be deep-copied on its own (its patched forward runs "
                    "the original's weights); deep-copy the whole model, or gsq_hf.unpatch it first")


def unpatch(model: nn.Module) -> nn.Module:
    """Undo `patch`: the model behaves exactly as before it was patched."""
    if not is_patched(model):
        raise NotPatchedError(f"{type(model).__name__} is not patched by gsq_hf; nothing to unpatch")
    state: _PatchState = model._gsq_patch
    for mixer, attr, previous in state.mixers:
        if previous is inspect.Parameter.empty:
            delattr(mixer, attr)
        else:
            setattr(mixer, attr, previous)
        del mixer.__deepcopy__
    for handle in state.handles:
        handle.remove()
    if state.had_gsq_config:
        model.config.gsq_config = state.previous_gsq_config
    else:
        del model.config.gsq_config
    del model._gsq_patch
    del model.__deepcopy__
    return model


@contextlib.contextmanager
def patched(model: nn.Module, config: GSQConfig | str | Path | dict | None = None) -> Iterator[nn.Module]:
    """``with gsq_hf.patched(model, "int8"): ...`` — patched inside the block, restored after it."""
    patch(model, config)
    try:
        yield model
    finally:
        unpatch(model)


def from_pretrained(path: str | Path, config: GSQConfig | str | Path | dict | None = None, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` patched with the given config, else the one saved
    with it (`GSQConfig.from_pretrained`: ``gsq_config.json`` or config.json's ``gsq_config``), else the default.

    A ``path`` that is neither a saved model directory (with config.json) nor a possible Hub id is a
    `FileNotFoundError` saying what is accepted, before transformers' Hub-id validator calls it a bad repo id.
    """
    from transformers import AutoModelForCausalLM

    from .locations import ACCEPTED_MODELS, model_path_problem

    problem = None if kwargs.get("subfolder") else model_path_problem(path)  # a subfolder: transformers checks
    if problem is not None:
        raise FileNotFoundError(f"{problem}; accepted: {ACCEPTED_MODELS}")
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if config is None:
        lookup = ("revision", "subfolder", "token", "cache_dir", "local_files_only")
        config = saved_config(path, **{key: kwargs[key] for key in lookup if key in kwargs})
    return patch(model, config)
