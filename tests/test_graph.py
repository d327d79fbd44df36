"""`gsq_hf.generate_graph`: the tokens of greedy ``generate``, from a decode step a graph can capture.

On CPU the step runs eagerly; its graph safety is checked by tracing it with ``torch.compile(fullgraph=True,
backend="eager")`` (a host sync or a Python branch on a tensor's value is an error there, as in a CUDA graph
capture) and by running it with the Python-level host syncs of a tensor made to raise.
"""

import contextlib

import pytest
import torch

import gsq_hf
from gsq_hf import GSQCache
from gsq_hf.errors import NotPatchedError
from gsq_hf.graph import _Decode

PROMPT = torch.randint(2, 64, (3, 6), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("config", ["fp32", "int4", "gsq-4bit", "gsq-gate", "gsq-entropy"])
def test_tokens_and_report_equal_greedy_generate(family, model, config):
    gsq_hf.patch(model, config)
    expected = model.generate(PROMPT, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    cache = GSQCache(model, config, static=True)
    tokens = gsq_hf.generate_graph(model, PROMPT, 12, cache=cache, check_every=5)
    assert torch.equal(tokens, expected.sequences)
    assert cache.memory_report() == expected.cache.memory_report()  # device counters count every step alike


def test_eos_stops_and_pads_like_generate_with_left_padding(model):
    gsq_hf.patch(model, "int8")
    ids, mask = PROMPT.clone(), torch.ones_like(PROMPT)
    ids[0, :2], mask[0, :2] = 0, 0
    free = gsq_hf.generate_graph(model, ids, 10, attention_mask=mask)[:, 6:]
    # a token only row 1 emits (it finishes, the others go on: padding), then every row's first (all stop at once)
    for eos in ([int(free[1, 2])], free[:, 0].tolist()):
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                                  pad_token_id=0)
        assert expected.shape[1] < 16 or (expected[:, 6:] == 0).any()
        for check_every in (1, 4, 100):
            tokens = gsq_hf.generate_graph(model, ids, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=0,
                                           check_every=check_every)
            assert torch.equal(tokens, expected)


def decode_step(model, config):
    """The decode step `generate_graph` captures, after a prompt and one eager step (first-call logging)."""
    cache = GSQCache(model, config, static=True)
    cache.defer_finite_check = True  # as generate_graph sets it: the flags are read between steps
    run = _Decode(model, PROMPT, None, 4, torch.tensor([1]), 0, 16)
    token, unfinished = PROMPT[:, -1:].clone(), torch.ones(PROMPT.shape[0], dtype=torch.bool)
    model(PROMPT, cache=cache, use_cache=True)
    run.step(cache, token, unfinished)
    return lambda: run.step(cache, token, unfinished), cache


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("config", ["int8", "gsq-gate", "gsq-budget", "gsq-entropy"])
def test_decode_step_traces_as_one_graph(family, model, config):
    torch._dynamo.reset()
    gsq_hf.patch(model, config)
    with torch.no_grad():
        step, cache = decode_step(model, config)
        torch.compile(step, fullgraph=True, backend="eager")()
        if config == "int8":  # the default cache's per-layer NaN probe is a host sync: the same trace fails
            cache.static = False
            cache.reset()
            model(PROMPT, cache=cache, use_cache=True)
            torch._dynamo.reset()
            with pytest.raises(torch._dynamo.exc.UserError, match="data-dependent"):
                torch.compile(step, fullgraph=True, backend="eager")()


@contextlib.contextmanager
def host_syncs_raise(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a host sync in the decode step")

    with monkeypatch.context() as patched:
        for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"):
            patched.setattr(torch.Tensor, name, refuse)
        yield


def test_decode_step_reads_no_tensor_value_on_the_host(model, monkeypatch):
    gsq_hf.patch(model, "gsq-gate")
    with torch.no_grad():
        step, cache = decode_step(model, "gsq-gate")
        with host_syncs_raise(monkeypatch):
            step()
        cache.static = False  # the default cache: the probe's bool() is caught
        cache.reset()
        model(PROMPT, cache=cache, use_cache=True)
        with host_syncs_raise(monkeypatch), pytest.raises(AssertionError, match="host sync"):
            step()


def test_a_nonfinite_state_redoes_the_run_with_the_default_cache(family, model):
    mixer = model.backbone.layers[1].mixer
    with torch.no_grad():
        (mixer.dt_proj.bias if family == "mamba" else mixer.dt_bias)[0] = float("nan")
    gsq_hf.patch(model, "int8")
    with pytest.warns(RuntimeWarning, match="non-finite SSM state in layer 1"):
        expected = model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    with pytest.warns(RuntimeWarning) as caught:  # the flag's warning, then the default cache's on the redo
        tokens = gsq_hf.generate_graph(model, PROMPT, 6, check_every=2)
    messages = [str(w.message) for w in caught]
    assert any("layer(s) [1] of the static cache; this generation is redone" in m for m in messages)
    assert all("layer 1" in m or "layer(s) [1]" in m for m in messages)
    assert torch.equal(tokens, expected)


def test_refusals(model):
    with pytest.raises(NotPatchedError, match="patched by gsq_hf.patch"):
        gsq_hf.generate_graph(model, PROMPT, 4)
    gsq_hf.patch(model, "int8")
    with pytest.raises(ValueError, match=r"static=True\), or no cache"):
        gsq_hf.generate_graph(model, PROMPT, 4, cache=GSQCache(model, "int8"))
    used = GSQCache(model, "int8", static=True)
    model(PROMPT, cache=used, use_cache=True)
    with pytest.raises(ValueError, match=r"empty static cache \(cache.reset\(\) empties one\)"):
        gsq_hf.generate_graph(model, PROMPT, 4, cache=used)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        gsq_hf.generate_graph(model, PROMPT, 4, use_graph=True)
    with pytest.raises(ValueError, match="must be integers >= 1"):
        gsq_hf.generate_graph(model, PROMPT, 0)
