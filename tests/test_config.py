import json

import pytest
import torch
import yaml

import gsq_hf
from gsq_hf import GSQConfig, GSQConfigError
from gsq_hf.config import resolve_config

PRESETS = ["bf16", "fp16", "fp32", "gsq-3bit", "gsq-4bit", "gsq-budget", "gsq-entropy", "gsq-gate", "int2", "int3",
           "int4", "int8"]


def test_presets_listed_and_load():
    assert gsq_hf.list_presets() == PRESETS
    for name in PRESETS:
        config = GSQConfig.from_preset(name)
        assert config.name == name
        config.build_policy()
    assert GSQConfig.from_preset("gsq-gate").policy == "gate"
    assert GSQConfig.from_preset("fp32").is_lossless


@pytest.mark.parametrize("name", PRESETS)
def test_round_trip_yaml_json_dict(name, tmp_path):
    config = GSQConfig.from_preset(name)
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
        ("rounding", "up", "rounding='up'.*nearest, stochastic"),
        ("write_mode", "sometimes", "every_step, end_of_forward"),
        ("threshold", 1.5, r"threshold=1.5 must be a number in \[0, 1\]"),
        ("budget_fraction", -0.1, "budget_fraction"),
        ("group_size", 1, "group_size=1"),
        ("conv_format", "int9", "'auto' \\(the model dtype\\) or unknown state format 'int9'; accepted: .*fp32"),
        ("high_when", "sometimes", "open, closed"),
    ],
)
def test_bad_values_name_field_and_accepted(field, value, message):
    with pytest.raises(GSQConfigError, match=message):
        GSQConfig(**{field: value})


def test_resolve_every_form(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("policy: static\nformat: int4\n")
    assert resolve_config(str(path)).format == "int4"
    assert resolve_config(str(path)).name == "mine"
    assert resolve_config({"policy": "static", "format": "bf16"}).format == "bf16"
    assert resolve_config("int8").format == "int8"
    assert resolve_config("int7") == GSQConfig(name="int7", policy="static", format="int7")  # a format name
    assert resolve_config("midrise3-e4m3-hadamard").format == "midrise3-e4m3-hadamard"
    with pytest.raises(GSQConfigError, match="unknown preset 'int9'; known presets: bf16, fp16.*or a state format"):
        resolve_config("int9")
    with pytest.raises(GSQConfigError, match="unknown GSQConfig field"):
        resolve_config({"polcy": "static"})
    with pytest.raises(GSQConfigError, match="does not exist"):
        resolve_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(GSQConfigError, match="got int"):
        resolve_config(3)
    assert json.loads(GSQConfig().to_json())["policy"] == "static"


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
    assert (mamba.rounding, mamba.format, mamba.name, mamba.family_overrides) == ("stochastic", "midrise4-e4m3",
                                                                                   "mixed", None)
    assert (mamba2.rounding, mamba2.format) == ("nearest", "int4-e4m3")
    model = gsq_hf.patch(tiny_mamba(), config)
    assert model(torch.randint(0, 64, (1, 4))).cache.config.rounding == "stochastic"
    model.save_pretrained(tmp_path)
    assert gsq_hf.from_pretrained(tmp_path)._gsq_patch.config == config  # saved with its overrides
    with pytest.raises(GSQConfigError, match=r"family_overrides\['mamba'\]: GSQConfig.rounding='up'"):
        GSQConfig(family_overrides={"mamba": {"rounding": "up"}})
    with pytest.raises(GSQConfigError, match="must map model types to mappings"):
        GSQConfig(family_overrides={"mamba": "stochastic"})
