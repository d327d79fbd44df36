import json

import pytest
import torch
import yaml

import gsq_hf
from gsq_hf import GSQConfig, GSQConfigError
from gsq_hf.config import BudgetConfig, EntropyConfig, GateConfig, StaticConfig, resolve_config
from gsq_hf.formats import get_format

PRESETS = ["bf16", "fp16", "fp32", "gsq-3bit", "gsq-4bit", "gsq-budget", "gsq-entropy", "gsq-gate", "int2", "int3",
           "int4", "int8"]


def test_presets_listed_and_load():
    assert gsq_hf.list_presets() == PRESETS
    for name in PRESETS:
        config = GSQConfig.from_preset(name)
        assert config.name == name
        config.build_policy()
    assert GSQConfig.from_preset("gsq-gate").policy == GateConfig(threshold=0.3, high_when="open", low="int8",
                                                                  high="fp16")
    assert GSQConfig.from_preset("fp32").is_lossless


@pytest.mark.parametrize("name", PRESETS)
def test_round_trip_yaml_json_dict(name, tmp_path):
    config = GSQConfig.from_preset(name)
    if name == "gsq-4bit":  # a non-default value of every top-level field travels too
        config = GSQConfig.from_dict(config.to_dict() | {"scale_hold": 0.75, "seed": 3, "group_size": 8})
    assert GSQConfig.from_dict(config.to_dict()) == config
    (tmp_path / "c.yaml").write_text(config.to_yaml())
    (tmp_path / "c.json").write_text(config.to_json())
    assert GSQConfig.from_file(tmp_path / "c.yaml") == config
    assert GSQConfig.from_file(tmp_path / "c.json") == config
    config.save_pretrained(tmp_path / "saved")
    assert GSQConfig.from_pretrained(tmp_path / "saved") == config


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("policy", "magic", "GSQConfig.policy='magic' is not accepted; choose one of: static, gate, entropy, budget"),
        ("format", "int9", "GSQConfig.format='int9'.*fp32, bf16, fp16, fp8, int8, int7, int6, int5, int4, int3, int2"),
        ("rounding", "up", "rounding='up'.*nearest, stochastic, quasirandom"),
        ("write_mode", "sometimes", "every_step, end_of_forward"),
        ("threshold", 1.5, r"threshold=1.5 must be a number in \[0, 1\]"),
        ("budget_fraction", -0.1, "budget_fraction"),
        ("group_size", 1, "group_size=1"),
        ("conv_format", "int9", "'auto' \\(the model dtype\\) or unknown state format 'int9'; accepted: .*fp32"),
        ("high_when", "sometimes", "open, closed"),
        ("scale_hold", 1.0, r"scale_hold=1.0 must be a number in \[0, 1\)"),
        ("scale_hold", -0.1, "scale_hold=-0.1"),
        ("scale_hold", "0.5", "scale_hold='0.5'"),
        ("scale_hold", True, "scale_hold=True"),
        ("scale_hold", float("nan"), "scale_hold=nan"),
        ("seed", True, "seed=True must be an integer"),
        ("name", 5, "name=5 must be a non-empty string"),
        ("family_overrides", {"mambo": {"rounding": "stochastic"}},
         "key 'mambo' is not a transformers model type .*did you mean mamba"),  # a typo would never apply
    ],
)
def test_bad_values_name_field_and_accepted(field, value, message):
    with pytest.raises(GSQConfigError, match=message):
        GSQConfig(**{field: value})


def test_resolve_every_form(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("policy: static\nformat: int4\n")
    assert resolve_config(str(path)).policy == StaticConfig(format="int4")
    assert resolve_config(str(path)).name == "mine"
    assert resolve_config({"policy": "static", "format": "bf16"}).policy.format == "bf16"
    assert resolve_config("int8").policy.format == "int8"
    assert resolve_config("int7") == GSQConfig(name="int7", policy="static", format="int7")  # a format name
    assert resolve_config("midrise3-e4m3-hadamard").policy.format == "midrise3-e4m3-hadamard"
    with pytest.raises(GSQConfigError, match="unknown preset 'int9'; known presets: bf16, fp16.*or a state format"):
        resolve_config("int9")
    with pytest.raises(GSQConfigError, match="unknown GSQConfig field"):
        resolve_config({"polcy": "static"})
    with pytest.raises(GSQConfigError, match="does not exist"):
        resolve_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(GSQConfigError, match="got int"):
        resolve_config(3)
    assert json.loads(GSQConfig().to_json())["policy"] == {"kind": "static", "format": "fp32"}


@pytest.mark.parametrize(
    "file, content, message",
    [
        ("list.yaml", "- a\n- b\n", "holds a YAML list, not a mapping of fields; accepted: a YAML mapping"),
        ("word.yaml", "int8\n", "holds a YAML string, not a mapping"),
        ("syntax.yaml", "policy: [static\n", r"is not valid YAML at line 2, column 1: expected ',' or '\]'"),
        ("tag.yaml", "policy: !!python/object:os.system {}\n",
         r"is not plain YAML at line 1, column 9 .*only plain YAML is accepted"),
        ("bad.json", '{"policy": ', "is not valid JSON: line 1, column 12: Expecting value; accepted: a JSON object"),
        ("list.json", '[{"policy": "static"}]', "holds a JSON list, not a mapping"),
        ("binary.yaml", b"\x89PNG\r\n\x1a\n\xff", "is not UTF-8 text"),
        ("field.yaml", "polcy: static\n", r"unknown GSQConfig field\(s\) \['polcy'\]; accepted: budget_fraction"),
        ("value.json", '{"format": "int9"}', "GSQConfig.format='int9' is not accepted"),
    ],
)
def test_bad_config_file_is_one_line_naming_the_file(tmp_path, file, content, message):
    """Every way a config file can be wrong is a GSQConfigError naming the file, from each entry point."""
    path = tmp_path / file
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for load in (GSQConfig.from_file, resolve_config, lambda p: gsq_hf.patch(torch.nn.Linear(1, 1), p)):
        with pytest.raises(GSQConfigError, match=message) as caught:
            load(str(path))
        assert str(caught.value).startswith(f"config file {str(path)!r}") and "\n" not in str(caught.value)


def test_empty_config_file_is_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert GSQConfig.from_file(tmp_path / "empty.yaml") == GSQConfig(name="empty")


def test_family_overrides_apply_where_a_cache_meets_a_model(tmp_path):
    from models import tiny_mamba, tiny_mamba2

    config = GSQConfig(name="mixed", policy="static", format="int4-e4m3",
                       family_overrides={"mamba": {"rounding": "stochastic", "format": "midrise4-e4m3"}})
    assert resolve_config(config.to_dict()) == config == GSQConfig.from_dict(yaml.safe_load(config.to_yaml()))
    mamba, mamba2 = gsq_hf.GSQCache(tiny_mamba(), config).config, gsq_hf.GSQCache(tiny_mamba2().config, config).config
    assert (mamba.rounding, mamba.policy.format, mamba.name, mamba.family_overrides) == (
        "stochastic", "midrise4-e4m3", "mixed", None)
    assert (mamba2.rounding, mamba2.policy.format) == ("nearest", "int4-e4m3")
    model = gsq_hf.patch(tiny_mamba(), config)
    assert model(torch.randint(0, 64, (1, 4))).cache.config.rounding == "stochastic"
    model.save_pretrained(tmp_path)
    assert gsq_hf.from_pretrained(tmp_path)._gsq_patch.config == config  # saved with its overrides
    with pytest.raises(GSQConfigError, match=r"family_overrides\['mamba'\]: GSQConfig.rounding='up'"):
        GSQConfig(family_overrides={"mamba": {"rounding": "up"}})
    with pytest.raises(GSQConfigError, match="must map model types to mappings"):
        GSQConfig(family_overrides={"mamba": "stochastic"})


def test_layer_overrides_apply_per_layer_and_round_trip(tmp_path):
    """`layer_overrides` gives a layer its own fields (mixed precision by layer); keys come back as layer
    indices from JSON (save_pretrained) and YAML."""
    from models import tiny_mamba2

    config = GSQConfig(name="by-layer", format="midrise3-e4m3-hadamard",
                       layer_overrides={1: {"format": "int8", "rounding": "stochastic"}})
    assert config.for_layer(0) is config
    layer1 = config.for_layer(1)
    assert (layer1.policy.format, layer1.rounding, layer1.layer_overrides, layer1.name) == (
        "int8", "stochastic", None, "by-layer")
    assert resolve_config(config.to_dict()) == config == GSQConfig.from_dict(yaml.safe_load(config.to_yaml()))
    assert GSQConfig.from_dict(json.loads(config.to_json())) == config
    model = gsq_hf.patch(tiny_mamba2(), config)
    cache = model(torch.randint(0, 64, (1, 4))).cache
    assert [layer.storage.low.fmt.name for layer in cache.gsq_layers] == ["midrise3-e4m3-hadamard", "int8"]
    assert [layer.generator(torch.device("cpu")) is None for layer in cache.gsq_layers] == [True, False]
    bits = [get_format(name).bits_per_element(8) for name in ("midrise3-e4m3-hadamard", "int8")]  # d_state 8
    assert cache.memory_report()["avg_state_bits"] == pytest.approx(sum(bits) / 2, rel=0.02)  # each its own
    traced = gsq_hf.GSQCache(model, config, trace=True)
    model(torch.randint(0, 64, (1, 4)), cache=traced)
    assert traced.precision_trace()["layer_formats"] == [("midrise3-e4m3-hadamard", None), ("int8", None)]
    model.save_pretrained(tmp_path)
    assert gsq_hf.from_pretrained(tmp_path)._gsq_patch.config == config


def test_layer_overrides_refuse_what_is_not_per_layer():
    from models import tiny_mamba

    for bad, match in [({"x": {}}, "'x' is not a layer index"), ({-1: {}}, "-1 is not a layer index"),
                       ({1: "int4"}, "must map layer indices to mappings"),
                       ({1: {"seed": 3}}, r"layer_overrides\[1\] cannot set seed \(one per cache\)"),
                       ({1: {"rounding": "up"}}, r"layer_overrides\[1\]: GSQConfig.rounding='up'"),
                       ({1: {"layer_overrides": {}}}, "cannot set layer_overrides"),
                       ({"1": {}, 1: {}}, "layer 1 is given twice")]:
        with pytest.raises(GSQConfigError, match=match):
            GSQConfig(layer_overrides=bad)
    with pytest.raises(GSQConfigError, match="cannot set name, family_overrides or layer_overrides"):
        GSQConfig(family_overrides={"mamba": {"layer_overrides": {0: {}}}})
    config = GSQConfig(layer_overrides={5: {"format": "int8"}})
    with pytest.raises(GSQConfigError, match=r"layer\(s\) \[5\], which hold no Mamba state.*state layers: \[0, 1\]"):
        gsq_hf.patch(tiny_mamba(), config)
    with pytest.raises(GSQConfigError, match=r"layer\(s\) \[5\]"):
        gsq_hf.GSQCache(tiny_mamba().config, config)
    with pytest.raises(GSQConfigError, match=r"int3-e4m3-hadamard \(layer 1\) rotates along d_state"):
        gsq_hf.patch(tiny_mamba(state_size=12), GSQConfig(format="int8", layer_overrides={1: {
            "format": "int3-e4m3-hadamard"}}))


# -- the nested form and the flat keys of earlier versions --------------------------------------------------
# the whole of a gsq-gate config as saved in a model's config.json (key gsq_config) before policies were nested
SAVED_FLAT_GATE = {"name": "gsq-gate", "policy": "gate", "format": "fp32", "low_format": "int8", "high_format": "fp16",
                   "threshold": 0.3, "high_when": "open", "budget_fraction": 0.25, "entropy_signal": "entropy",
                   "conv_format": "auto", "group_size": None, "rounding": "nearest", "seed": 0,
                   "write_mode": "every_step", "family_overrides": None, "kernel": "auto"}


@pytest.mark.parametrize("flat, nested", [
    (dict(policy="static", format="int4"), StaticConfig(format="int4")),
    (dict(format="int4"), StaticConfig(format="int4")),
    (dict(policy="gate", threshold=0.5, high_when="closed", low_format="int4", high_format="int8"),
     GateConfig(threshold=0.5, high_when="closed", low="int4", high="int8")),
    (dict(policy="entropy", threshold=0.6, entropy_signal="surprisal", low_format="int4"),
     EntropyConfig(threshold=0.6, signal="surprisal", low="int4")),
    (dict(policy="budget", budget_fraction=0.5, high_when="closed", high_format="bf16"),
     BudgetConfig(fraction=0.5, high_when="closed", high="bf16")),
    (dict(policy="gate", format="int4", budget_fraction=0.9, entropy_signal="surprisal"), GateConfig()),  # ignored
])
def test_flat_keys_map_onto_the_policy_config(flat, nested):
    """docs/configuration.md's mapping: flat keywords, flat dicts and flat files give the nested config."""
    assert GSQConfig(**flat).policy == nested
    assert GSQConfig.from_dict(flat) == GSQConfig(policy=nested) == GSQConfig.from_dict({"policy": nested.to_dict()})
    assert GSQConfig(policy=nested.kind, **{k: v for k, v in flat.items() if k != "policy"}).policy == nested


def test_config_saved_flat_in_config_json_loads_to_the_same_behaviour(tmp_path):
    from models import tiny_mamba

    assert GSQConfig.from_dict(SAVED_FLAT_GATE) == GSQConfig.from_preset("gsq-gate")
    model = tiny_mamba()
    model.config.gsq_config = dict(SAVED_FLAT_GATE)  # as an earlier version saved it
    model.save_pretrained(tmp_path)
    reloaded = gsq_hf.from_pretrained(tmp_path)
    assert reloaded._gsq_patch.config == GSQConfig.from_preset("gsq-gate")
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    report = reloaded(ids).cache.memory_report()
    assert set(report["format_fractions"]) == {"int8", "fp16", "fp32_fallback"}


def test_nested_form_round_trips_and_is_what_is_saved(tmp_path):
    config = GSQConfig(name="mine", policy=GateConfig(threshold=0.4, low="int4-e4m3", high="fp16"),
                       rounding="stochastic", write_mode="end_of_forward", kernel="torch")
    data = config.to_dict()
    assert data["policy"] == {"kind": "gate", "threshold": 0.4, "high_when": "open", "low": "int4-e4m3",
                              "high": "fp16"}
    assert GSQConfig.from_dict(data) == config == GSQConfig.from_dict(json.loads(config.to_json()))
    assert GSQConfig.from_dict(yaml.safe_load(config.to_yaml())) == config
    config.save_pretrained(tmp_path)
    assert GSQConfig.from_pretrained(tmp_path) == config
    (tmp_path / "nested.yaml").write_text("policy:\n  kind: entropy\n  threshold: 0.7\n  low: int4\n")
    assert resolve_config(str(tmp_path / "nested.yaml")).policy == EntropyConfig(threshold=0.7, low="int4")
    assert GSQConfig(policy={"kind": "budget"}).policy == BudgetConfig()


@pytest.mark.parametrize("kwargs, message", [
    (dict(policy={"kind": "magic"}), "GSQConfig.policy='magic' is not accepted; choose one of: static, gate"),
    (dict(policy={"kind": "gate", "thresh": 1}), r"unknown GateConfig field\(s\) \['thresh'\]; accepted: kind, "
                                                 "threshold, high_when, low, high"),
    (dict(policy={"threshold": 0.3}), "GSQConfig.policy=None is not accepted; choose one of"),
    (dict(policy=GateConfig(), format="int4"), "GSQConfig.format does not apply to policy 'gate'"),
    (dict(threshold=0.3, low_format="int4"), "GSQConfig.threshold does not apply to policy 'static', the default "
                                             "when no policy is given; .*policy: gate"),  # not a silent fp32
    (dict(policy="gate", threshold="high"), r"GSQConfig.threshold='high' must be a number in \[0, 1\]"),
    (dict(policy="budget", high_when="sometimes"), "GSQConfig.high_when='sometimes' is not accepted; choose one of: "
                                                   "open, closed"),
    (dict(policy="entropy", entropy_signal="perplexity"), "entropy_signal='perplexity'.*entropy, surprisal"),
])
def test_bad_policy_values_are_one_line(kwargs, message):
    with pytest.raises(GSQConfigError, match=message) as caught:
        GSQConfig(**kwargs)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("make, message", [
    (lambda: GateConfig(threshold=2), r"GateConfig.threshold=2 must be a number in \[0, 1\]"),
    (lambda: BudgetConfig(fraction=-1), r"BudgetConfig.fraction=-1 must be"),
    (lambda: EntropyConfig(low="int9"), "EntropyConfig.low='int9' is not accepted; unknown state format 'int9'"),
    (lambda: StaticConfig(format={"codes": "int4", "scale": "e4m3"}), None),  # parts: stored by name
])
def test_policy_configs_validate_on_construction(make, message):
    if message is None:
        assert make().format == "int4-e4m3"
        return
    with pytest.raises(GSQConfigError, match=message):
        make()
