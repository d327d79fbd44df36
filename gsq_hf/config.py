"""`GSQConfig`: what state precision a patched model uses, validated on construction.

A config comes from a preset name (``configs/<name>.yaml``), a YAML or JSON path, a dict, or is built
directly. It round-trips through YAML/JSON and is saved inside the model's ``config.json`` by
``save_pretrained`` after ``patch`` (key ``gsq_config``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import GSQConfigError
from .formats import ROUNDING_MODES, get_format
from .policies import (
    POLICY_CONFIGS,
    BudgetConfig,
    EntropyConfig,
    GateConfig,
    PolicyConfig,
    PrecisionPolicy,
    StaticConfig,
    policy_config,
)
from .signals import check_signals

__all__ = ["BudgetConfig", "EntropyConfig", "GSQConfig", "GateConfig", "PolicyConfig", "StaticConfig", "list_presets",
           "resolve_config"]

WRITE_MODES = ("every_step", "end_of_forward")
KERNELS = ("auto", "triton", "torch")
CONFIG_FILENAME = "gsq_config.json"


def _choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise GSQConfigError(f"GSQConfig.{name}={value!r} is not accepted; choose one of: {', '.join(accepted)}")


def _flat_keys() -> dict[str, tuple[type[PolicyConfig], str]]:
    """Each flat policy key of the old single-level configs (``threshold``, ``low_format`` …), with a policy
    config class that has it (for its check) and the field it maps to there."""
    keys: dict[str, tuple[type[PolicyConfig], str]] = {}
    for cls in POLICY_CONFIGS.values():
        for key, name in cls.flat_keys.items():
            keys.setdefault(key, (cls, name))
    return keys


def _with_flat_keys(policy: Any, flat: dict[str, Any]) -> PolicyConfig:
    """The policy config ``policy`` with the old flat keys ``flat`` applied (see docs/configuration.md).

    Each key is checked as ``GSQConfig.<key>``. A key the policy kind does not have is ignored when the policy
    is given by name (old configs carry every field, e.g. ``format`` beside ``policy: gate``) and refused when
    it is given as a config or mapping, or not at all (``threshold`` with no policy would silently store
    everything in one format: there it can only be a mistake).
    """
    config = policy_config("static" if policy is None else policy)
    owners = _flat_keys()
    params = {}
    for key, value in flat.items():
        cls, name = owners[key]
        check = next(f for f in fields(cls) if f.name == name).metadata["check"]
        value = check(f"GSQConfig.{key}", value)
        if key in config.flat_keys:
            params[config.flat_keys[key]] = value
        elif policy is None:
            raise GSQConfigError(f"GSQConfig.{key} does not apply to policy 'static', the default when no policy is "
                                 f"given; name the policy it belongs to (e.g. policy: {cls.kind}) or drop it")
        elif not isinstance(policy, str):
            raise GSQConfigError(f"GSQConfig.{key} does not apply to policy {config.kind!r} (its fields: "
                                 f"{', '.join(f.name for f in fields(config))}); set the policy's own fields")
    return dataclasses.replace(config, **params) if params else config


@dataclass(frozen=True, init=False)
class GSQConfig:
    """How a patched model stores its SSM and conv states.

    ``policy`` is a `PolicyConfig` (`StaticConfig`, `GateConfig`, `EntropyConfig`, `BudgetConfig`, or any
    registered with `gsq_hf.policies.register_policy`), a kind name (its defaults) or a mapping
    ``{kind: ..., <fields>}``. The flat keys of earlier versions (``format``, ``low_format``, ``high_format``,
    ``threshold``, ``high_when``, ``budget_fraction``, ``entropy_signal``) are still accepted as keyword
    arguments and in files, mapped onto the policy's fields (docs/configuration.md).

    Presets (``configs/*.yaml``): fp32, bf16, fp16, int8, int4, int3, int2, gsq-gate, gsq-entropy, gsq-budget, …
    """

    name: str = field(default="custom", metadata={"help": "label used in reports"})
    policy: PolicyConfig = field(default=StaticConfig(), metadata={
        "help": "which units get which format: a policy config, a kind (static | gate | entropy | budget) or a "
                "mapping {kind, <fields>}"})
    conv_format: str = field(default="auto", metadata={"help": "conv state format; 'auto' = the model dtype"})
    group_size: int | None = field(default=None, metadata={"help": "values per scale along d_state; None = all"})
    rounding: str = field(default="nearest", metadata={"help": "nearest | stochastic | quasirandom"})
    scale_hold: float = field(default=0.0, metadata={
        "help": "0 <= h < 1: a group keeps the scale of its previous write while its new absmax fits under it and "
                "is at least h of it (an e4m3 row scale likewise, down to a quarter), so values that did not move "
                "keep their codes; 0 = a fresh scale at every write (docs/formats.md)"})
    seed: int = field(default=0, metadata={"help": "seed of stochastic and quasi-random rounding"})
    write_mode: str = field(default="every_step", metadata={"help": "every_step | end_of_forward"})
    family_overrides: dict[str, dict[str, Any]] | None = field(default=None, metadata={
        "help": "fields that differ for some model types, e.g. {mamba: {rounding: stochastic}}: applied where a "
                "cache meets a model (`for_model_type`), so one preset can hold what each family measured best"})
    layer_overrides: dict[int, dict[str, Any]] | None = field(default=None, metadata={
        "help": "fields that differ for some layers, by model layer index, e.g. {2: {format: int5-e4m3-hadamard}}: "
                "a layer's policy (or its format), rounding, scale_hold, group_size or conv_format (`for_layer`); "
                "mixed precision by layer, e.g. from `scripts/format_front.py --per-layer`"})
    kernel: str = field(default="auto", metadata={
        "help": "decode-step state update and conv: 'auto' = the fused Triton kernels on CUDA, torch elsewhere; "
                "'triton' = the kernels wherever they run (CPU only under TRITON_INTERPRET=1); 'torch' = never"})

    def __init__(self, name: str = "custom", policy: PolicyConfig | str | dict | None = None, conv_format: str = "auto",
                 group_size: int | None = None, rounding: str = "nearest", scale_hold: float = 0.0, seed: int = 0,
                 write_mode: str = "every_step", family_overrides: dict[str, dict[str, Any]] | None = None,
                 layer_overrides: dict[int, dict[str, Any]] | None = None, kernel: str = "auto",
                 **flat_policy_keys: Any):
        unknown = sorted(set(flat_policy_keys) - set(_flat_keys()))
        if unknown:
            raise GSQConfigError(f"unknown GSQConfig field(s) {unknown}; accepted: {', '.join(_accepted_keys())}")
        values = dict(name=name, policy=_with_flat_keys(policy, flat_policy_keys), conv_format=conv_format,
                      group_size=group_size, rounding=rounding, scale_hold=scale_hold, seed=seed,
                      write_mode=write_mode,
                      family_overrides=family_overrides, layer_overrides=_layer_keys(layer_overrides),
                      kernel=kernel)
        for key, value in values.items():
            object.__setattr__(self, key, value)
        self._validate()

    def _validate(self) -> None:
        if self.conv_format != "auto":
            try:
                object.__setattr__(self, "conv_format", get_format(self.conv_format).name)
            except GSQConfigError as error:
                raise GSQConfigError(f"GSQConfig.conv_format={self.conv_format!r} is not accepted; 'auto' (the "
                                     f"model dtype) or {error}") from None
        _choice("rounding", self.rounding, ROUNDING_MODES)
        _choice("write_mode", self.write_mode, WRITE_MODES)
        _choice("kernel", self.kernel, KERNELS)
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 2):
            raise GSQConfigError(
                f"GSQConfig.group_size={self.group_size!r} must be an even integer >= 2 dividing d_state, or None"
            )
        if not isinstance(self.name, str) or not self.name:
            raise GSQConfigError(f"GSQConfig.name={self.name!r} must be a non-empty string (the label of reports)")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise GSQConfigError(f"GSQConfig.seed={self.seed!r} must be an integer")
        if isinstance(self.scale_hold, bool) or not isinstance(self.scale_hold, (int, float)) \
                or not 0 <= self.scale_hold < 1:
            raise GSQConfigError(f"GSQConfig.scale_hold={self.scale_hold!r} must be a number in [0, 1) (0: a fresh "
                                 "scale at every write)")
        object.__setattr__(self, "scale_hold", float(self.scale_hold))
        check_signals(self.policy.build())
        if self.family_overrides is not None:
            self._check_overrides()
        if self.layer_overrides is not None:
            self._check_layer_overrides()

    def _check_layer_overrides(self) -> None:
        for index, fields_ in self.layer_overrides.items():
            fixed = sorted(set(fields_) & _NOT_PER_LAYER)
            if fixed:
                raise GSQConfigError(f"GSQConfig.layer_overrides[{index}] cannot set {', '.join(fixed)} (one per "
                                     f"cache); a layer may set: {', '.join(_per_layer_keys())}")
            try:
                self.for_layer(index)
            except GSQConfigError as error:
                raise GSQConfigError(f"GSQConfig.layer_overrides[{index}]: {error}") from None

    def _check_overrides(self) -> None:
        overrides = self.family_overrides
        if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
            raise GSQConfigError(f"GSQConfig.family_overrides={overrides!r} must map model types to mappings of "
                                 "fields, e.g. {'mamba': {'rounding': 'stochastic'}}")
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        for model_type, fields_ in overrides.items():
            if model_type not in CONFIG_MAPPING_NAMES:  # a typo would never apply, silently
                near = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING_NAMES), n=3)
                hint = f"; did you mean {', '.join(near)}?" if near else ""
                raise GSQConfigError(f"GSQConfig.family_overrides key {model_type!r} is not a transformers model type "
                                     f"(model.config.model_type){hint}")
            if {"name", "family_overrides", "layer_overrides"} & set(fields_):
                raise GSQConfigError(f"GSQConfig.family_overrides[{model_type!r}] cannot set name, family_overrides "
                                     "or layer_overrides")
            try:
                self.for_model_type(model_type)
            except GSQConfigError as error:
                raise GSQConfigError(f"GSQConfig.family_overrides[{model_type!r}]: {error}") from None

    def for_model_type(self, model_type: str | None) -> GSQConfig:
        """This config as it applies to a model of ``model_type`` (``model.config.model_type``): its
        ``family_overrides`` entry applied (a ``policy`` replaces the policy, flat policy keys such as
        ``format`` change its fields), the overrides themselves dropped; unchanged for other types."""
        if not self.family_overrides:
            return self
        override = self.family_overrides.get(model_type, {})
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return GSQConfig.from_dict({**data, **override, "family_overrides": None})

    def for_layer(self, index: int) -> GSQConfig:
        """This config as it applies to model layer ``index``: its ``layer_overrides`` entry applied (as
        `for_model_type` applies a family's), the overrides dropped; unchanged for other layers."""
        override = (self.layer_overrides or {}).get(index)
        if override is None:
            return self
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return GSQConfig.from_dict({**data, **override, "layer_overrides": None})

    def check_layer_indices(self, state_layers: list[int], model: str) -> None:
        """Refuse ``layer_overrides`` indices that are not among ``model``'s state layers (model layer indices)."""
        missing = sorted(set(self.layer_overrides or {}) - set(state_layers))
        if missing:
            raise GSQConfigError(f"GSQConfig.layer_overrides names layer(s) {missing}, which hold no Mamba state in "
                                 f"{model}; its state layers: {sorted(state_layers)}")

    # -- policy -----------------------------------------------------------------------------------------
    def build_policy(self) -> PrecisionPolicy:
        """The policy object this config describes."""
        return self.policy.build()

    @property
    def is_lossless(self) -> bool:
        """True when every SSM state write is exact (every format of the policy fp32)."""
        return self.build_policy().is_lossless

    # -- (de)serialization ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field; ``policy`` as its mapping ``{kind, <fields>}``."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**data, "policy": self.policy.to_dict(), "family_overrides": copy.deepcopy(self.family_overrides),
                "layer_overrides": copy.deepcopy(self.layer_overrides)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GSQConfig:
        if not isinstance(data, dict):
            raise GSQConfigError(f"a GSQConfig is built from a mapping, got {type(data).__name__}")
        unknown = sorted(map(str, set(data) - set(_accepted_keys())))  # YAML keys may be numbers
        if unknown:
            raise GSQConfigError(f"unknown GSQConfig field(s) {unknown}; accepted: {', '.join(_accepted_keys())}")
        return cls(**data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> GSQConfig:
        """Load from a ``.yaml``/``.yml`` or ``.json`` file; every error names the file."""
        path = Path(path)
        data = {"name": path.stem, **_read_fields(path)}
        try:
            return cls.from_dict(data)
        except GSQConfigError as error:
            raise GSQConfigError(f"config file {str(path)!r}: {error}") from None

    @classmethod
    def from_preset(cls, name: str) -> GSQConfig:
        presets = list_presets()
        if name not in presets:
            raise GSQConfigError(f"unknown preset {name!r}; known presets: {', '.join(presets)} (or a state format "
                                 "name such as int4-e4m3-hadamard, or a YAML/JSON path)")
        return cls.from_dict(yaml.safe_load((_presets_dir() / f"{name}.yaml").read_text()))

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write ``gsq_config.json`` into ``save_directory``."""
        path = Path(save_directory) / CONFIG_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_pretrained(cls, pretrained: str | Path, **kwargs: Any) -> GSQConfig:
        """The config saved in a directory or Hub repo: its ``gsq_config.json`` (`save_pretrained`), else the
        ``gsq_config`` entry of its ``config.json`` (what a patched model's ``save_pretrained`` writes).
        ``kwargs`` go to transformers' file lookup (``revision``, ``subfolder``, ``token``, ...)."""
        config = saved_config(pretrained, **kwargs)
        if config is None:
            raise GSQConfigError(f"no gsq_hf config in {str(pretrained)!r}: expected {CONFIG_FILENAME} "
                                 "(GSQConfig.save_pretrained) or a gsq_config entry in config.json (the "
                                 "save_pretrained of a patched model)")
        return config


def saved_config(pretrained: str | Path, **kwargs: Any) -> GSQConfig | None:
    """The gsq_hf config saved with a model (`GSQConfig.from_pretrained`), or None if it has none; both
    places holding different configs is an error (which one a user meant cannot be guessed)."""
    from transformers.utils import cached_file

    def read(filename: str) -> dict | None:
        path = cached_file(pretrained, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **kwargs)
        return json.loads(Path(path).read_text()) if path else None

    own = read(CONFIG_FILENAME)
    entry = (read("config.json") or {}).get("gsq_config")
    if own is not None and entry is not None and GSQConfig.from_dict(own) != GSQConfig.from_dict(entry):
        raise GSQConfigError(f"{str(pretrained)!r} holds two different gsq_hf configs: {CONFIG_FILENAME} "
                             f"({GSQConfig.from_dict(own).name!r}) and config.json's gsq_config "
                             f"({GSQConfig.from_dict(entry).name!r}); delete one, or pass the config to use")
    found = own if own is not None else entry
    return None if found is None else GSQConfig.from_dict(found)


_NOT_PER_LAYER = {"name", "family_overrides", "layer_overrides", "write_mode", "kernel", "seed"}


def _per_layer_keys() -> list[str]:
    return [key for key in _accepted_keys() if key not in _NOT_PER_LAYER]


def _layer_keys(overrides: Any) -> dict[int, dict[str, Any]] | None:
    """``layer_overrides`` with int keys (JSON, and so save_pretrained, writes them as strings), checked."""
    if overrides is None:
        return None
    example = "e.g. {2: {'format': 'int5-e4m3-hadamard'}}"
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise GSQConfigError(f"GSQConfig.layer_overrides={overrides!r} must map layer indices to mappings of fields, "
                             f"{example}")
    keyed = {}
    for key, fields_ in overrides.items():
        index = int(key) if isinstance(key, str) and key.isdigit() else key
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise GSQConfigError(f"GSQConfig.layer_overrides: {key!r} is not a layer index (an integer >= 0), "
                                 f"{example}")
        if index in keyed:
            raise GSQConfigError(f"GSQConfig.layer_overrides: layer {index} is given twice")
        keyed[index] = dict(fields_)
    return keyed


def _accepted_keys() -> list[str]:
    """The keys of a config mapping: the fields, and the flat policy keys of earlier versions."""
    return sorted({f.name for f in fields(GSQConfig)} | set(_flat_keys()))


_ACCEPTED = {"YAML": "a YAML mapping of GSQConfig fields, one per line, such as 'policy: static'",
             "JSON": 'a JSON object of GSQConfig fields, such as {"policy": "static"}'}
_KINDS = {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}


def _read_fields(path: Path) -> dict[str, Any]:
    """The mapping of fields in a config file, parsed safely (plain YAML/JSON only).

    Every way the file can be unusable (missing, not text, bad syntax, a Python tag, a list instead of a
    mapping) is one `GSQConfigError` line naming the file, not a parser traceback. An empty file is ``{}``.
    """
    where = f"config file {str(path)!r}"
    if not path.is_file():
        raise GSQConfigError(f"{where} does not exist")
    language = "JSON" if path.suffix == ".json" else "YAML"
    accepted = _ACCEPTED[language]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GSQConfigError(f"{where} is not UTF-8 text; accepted: {accepted}") from None
    except OSError as error:
        raise GSQConfigError(f"{where} cannot be read ({error.strerror}); accepted: {accepted}") from None
    try:
        data = json.loads(text) if language == "JSON" else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise GSQConfigError(f"{where} is not valid JSON: line {error.lineno}, column {error.colno}: {error.msg}; "
                             f"accepted: {accepted}") from None
    except yaml.YAMLError as error:
        raise GSQConfigError(f"{where} {_yaml_problem(error)}; accepted: {accepted}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = _KINDS.get(type(data), type(data).__name__)
        raise GSQConfigError(f"{where} holds a {language} {kind}, not a mapping of fields; accepted: {accepted}")
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line for a yaml error: where (line, column, 1-based) and what, without yaml's multi-line excerpt."""
    mark = getattr(error, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if isinstance(error, yaml.constructor.ConstructorError):  # a tag such as !!python/object
        return f"is not plain YAML{at} ({problem}); only plain YAML is accepted (yaml.safe_load: no !!python tags)"
    context = getattr(error, "context", None)
    return f"is not valid YAML{at}: {problem}" + (f" ({context})" if context else "")


def _presets_dir() -> Path:
    """``configs/``: installed inside the package by a wheel, beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    return next(d for d in (here / "configs", here.parent / "configs") if d.is_dir())


def list_presets() -> list[str]:
    """Names of the presets shipped in ``configs/``."""
    return sorted(p.stem for p in _presets_dir().glob("*.yaml"))


def resolve_config(config: GSQConfig | str | Path | dict | None) -> GSQConfig:
    """Accept a `GSQConfig`, a preset name, a state format name (one format everywhere, e.g.
    ``"int4-e4m3-hadamard"``), a YAML/JSON path or a dict."""
    if isinstance(config, GSQConfig):
        return config
    if isinstance(config, dict):
        return GSQConfig.from_dict(config)
    if isinstance(config, (str, Path)):
        text = str(config)
        if text.endswith((".yaml", ".yml", ".json")) or Path(text).is_file():
            return GSQConfig.from_file(text)
        if text not in list_presets():
            try:
                return GSQConfig(name=text, policy=StaticConfig(format=get_format(text).name))
            except GSQConfigError:
                pass  # neither: the preset lookup says what is accepted
        return GSQConfig.from_preset(text)
    raise GSQConfigError(
        f"config must be a GSQConfig, a preset name, a state format name, a YAML/JSON path or a dict; got "
        f"{type(config).__name__}"
    )
