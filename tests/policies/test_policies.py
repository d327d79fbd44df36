import torch

from gsq_hf.formats import FORMATS
from gsq_hf.policies import EntropyThresholdPolicy, GateBudgetPolicy, GateThresholdPolicy, Signals, StaticPolicy

INT8, FP16, INT4 = FORMATS["int8"], FORMATS["fp16"], FORMATS["int4"]
GATE = torch.tensor([[0.05, 0.30, 0.90, 0.29], [0.50, 0.00, 0.31, 0.10]])


def signals(gate=GATE, row_signal=None):
    return Signals(tuple(gate.shape), gate.device, gate, row_signal)


def test_static_marks_nothing():
    policy = StaticPolicy(INT8)
    assert policy.choose(signals()) is None
    assert policy.formats == (INT8,) and policy.high_capacity(4) == 0


def test_gate_threshold_open_and_closed():
    open_ = GateThresholdPolicy(INT8, FP16, threshold=0.3).choose(signals())
    assert open_.tolist() == [[False, True, True, False], [True, False, True, False]]  # at threshold -> high
    closed = GateThresholdPolicy(INT8, FP16, threshold=0.3, high_when="closed").choose(signals())
    assert torch.equal(closed, ~open_)
    assert GateThresholdPolicy(INT8, FP16, 0.3).high_capacity(4) == 4


def test_entropy_per_row_and_missing_signal():
    policy = EntropyThresholdPolicy(INT4, FP16, threshold=0.5)
    mask = policy.choose(signals(row_signal=torch.tensor([0.7, 0.2])))
    assert mask.tolist() == [[True] * 4, [False] * 4]
    assert policy.choose(signals()).all()  # no logits yet: conservative


def test_budget_picks_top_fraction_by_gate():
    policy = GateBudgetPolicy(INT4, FP16, fraction=0.5)
    assert policy.high_capacity(4) == 2
    mask = policy.choose(signals())
    assert mask.tolist() == [[False, True, True, False], [True, False, True, False]]
    closed = GateBudgetPolicy(INT4, FP16, fraction=0.25, high_when="closed").choose(signals())
    assert closed.tolist() == [[True, False, False, False], [False, True, False, False]]
    assert mask.sum(1).tolist() == [2, 2]
