"""A new policy is one file plus a preset: a policy defined and registered here, outside the package, patches a
model and decides which units are stored in which format."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import gsq_hf
from gsq_hf import GSQConfig, GSQConfigError
from gsq_hf.formats import get_format
from gsq_hf.policies import POLICY_CONFIGS, PolicyConfig, PrecisionPolicy, Signals, register_policy
from gsq_hf.policies.base import fraction, option, state_format


class EvenUnitsPolicy(PrecisionPolicy):
    """Units with an even index high: reads no signal, so the expected formats are known exactly."""

    def choose(self, signals: Signals) -> torch.Tensor:
        batch, units = signals.shape
        return (torch.arange(units, device=signals.device) % 2 == 0).expand(batch, units)


class GateBandPolicy(PrecisionPolicy):
    """Units whose gate lies in [lo, hi) high: reads the gate signal."""

    signals = frozenset({"gate"})

    def __init__(self, low, high, lo: float, hi: float):
        super().__init__(low, high)
        self.lo, self.hi = lo, hi

    def choose(self, signals: Signals) -> torch.Tensor:
        gate = signals.get("gate")
        return (gate >= self.lo) & (gate < self.hi)


@dataclass(frozen=True)
class EvenUnitsConfig(PolicyConfig):
    low: str = option("int4", state_format, "odd units")
    high: str = option("fp16", state_format, "even units")

    def build(self) -> EvenUnitsPolicy:
        return EvenUnitsPolicy(get_format(self.low), get_format(self.high))


@dataclass(frozen=True)
class GateBandConfig(PolicyConfig):
    lo: float = option(0.0, fraction, "lower gate bound")
    hi: float = option(0.5, fraction, "upper gate bound")
    low: str = option("int8", state_format, "outside the band")
    high: str = option("fp32", state_format, "inside the band")

    def build(self) -> GateBandPolicy:
        return GateBandPolicy(get_format(self.low), get_format(self.high), self.lo, self.hi)


@pytest.fixture
def registered():
    """Register the two kinds for one test (the registry is global: leave it as found)."""
    register_policy("even-units")(EvenUnitsConfig)
    register_policy("gate-band")(GateBandConfig)
    yield
    POLICY_CONFIGS.pop("even-units")
    POLICY_CONFIGS.pop("gate-band")


def test_registered_policy_patches_a_model_and_decides_the_formats(registered, model, tmp_path):
    config = GSQConfig(name="even", policy=EvenUnitsConfig(low="int4", high="fp16"))
    gsq_hf.patch(model, config)
    ids = torch.randint(2, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 8)
    for layer in out.cache.gsq_layers:
        storage = layer.storage
        units = storage.low.shape[1]
        assert storage.low.fmt.name == "int4" and storage.high.fmt.name == "fp16"
        assert storage.high_valid.tolist() == [[u % 2 == 0 for u in range(units)]] * 2
    fractions = out.cache.memory_report()["format_fractions"]
    assert fractions["fp16"] == pytest.approx(0.5) and fractions["int4"] == pytest.approx(0.5)
    # it saves and reloads by its kind like a built-in one (a preset is a YAML file of the same mapping)
    (tmp_path / "even.yaml").write_text("policy:\n  kind: even-units\n  low: int8\n")
    assert gsq_hf.resolve_config(str(tmp_path / "even.yaml")).policy == EvenUnitsConfig(low="int8")
    model.save_pretrained(tmp_path / "saved")
    assert gsq_hf.from_pretrained(tmp_path / "saved")._gsq_patch.config == config


def test_registered_policy_reads_the_signal_it_declares(registered, model):
    gsq_hf.patch(model, {"policy": {"kind": "gate-band", "lo": 0.2, "hi": 0.6}})
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    cache = model(ids).cache
    seen = 0
    for layer in cache.gsq_layers:
        gate = layer.last_gate  # the gate of the last write, handed to the policy
        assert gate is not None
        assert torch.equal(layer.storage.high_valid, (gate >= 0.2) & (gate < 0.6))
        seen += int(layer.storage.high_valid.sum())
    assert 0 < seen  # the band holds some units: the check above is not vacuous
    assert layer.storage.high.fmt.name == "fp32"


def test_policy_reading_an_unknown_signal_is_refused(registered):
    class Unknown(EvenUnitsPolicy):
        signals = frozenset({"temperature"})

    @dataclass(frozen=True)
    class UnknownConfig(EvenUnitsConfig):
        def build(self):
            return Unknown(get_format(self.low), get_format(self.high))

    register_policy("unknown-signal")(UnknownConfig)
    try:
        with pytest.raises(GSQConfigError, match=r"reads signal\(s\) \['temperature'\]; known: entropy, gate"):
            GSQConfig(policy="unknown-signal")
    finally:
        POLICY_CONFIGS.pop("unknown-signal")
