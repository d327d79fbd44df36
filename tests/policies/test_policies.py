import torch

from gsq_hf.formats import FORMATS
from gsq_hf.policies import EntropyThresholdPolicy, GateBudgetPolicy, GateThresholdPolicy, Signals, StaticPolicy

INT8, FP16, INT4 = FORMATS["int8"], FORMATS["fp16"], FORMATS["int4"]
GATE = torch.tensor([[0.05, 0.30, 0.90, 0.29], [0.50, 0.00, 0.31, 0.10]])


def signals(gate=GATE, row_signal=None, row_name="entropy"):
    values = {"gate": gate} | ({row_name: row_signal} if row_signal is not None else {})
    return Signals(tuple(gate.shape), gate.device, values)


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
    surprisal = EntropyThresholdPolicy(INT4, FP16, threshold=0.5, signal="surprisal")
    assert surprisal.signals == {"surprisal"} and policy.signals == {"entropy"}
    assert surprisal.choose(signals(row_signal=torch.tensor([0.7, 0.2]))).all()  # reads its own signal only
    rows = signals(row_signal=torch.tensor([0.7, 0.2]), row_name="surprisal")
    assert surprisal.choose(rows).tolist() == mask.tolist()


def test_policies_declare_their_signals_and_kernel_rule():
    assert StaticPolicy(INT8).signals == frozenset() and StaticPolicy(INT8).kernel_rule() == ("static", 0.0)
    gate = GateThresholdPolicy(INT8, FP16, 0.3, "closed")
    assert gate.signals == {"gate"} and gate.kernel_rule() == ("closed", 0.3)
    budget = GateBudgetPolicy(INT4, FP16, 0.5)
    assert budget.signals == {"gate"} and budget.kernel_rule() is None
    assert EntropyThresholdPolicy(INT4, FP16, 0.5).kernel_rule() == ("row", 0.0)


def test_budget_picks_top_fraction_by_gate():
    policy = GateBudgetPolicy(INT4, FP16, fraction=0.5)
    assert policy.high_capacity(4) == 2
    mask = policy.choose(signals())
    assert mask.tolist() == [[False, True, True, False], [True, False, True, False]]
    closed = GateBudgetPolicy(INT4, FP16, fraction=0.25, high_when="closed").choose(signals())
    assert closed.tolist() == [[True, False, False, False], [False, True, False, False]]
    assert mask.sum(1).tolist() == [2, 2]
