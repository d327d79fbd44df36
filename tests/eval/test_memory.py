"""``gsq-hf memory`` measurement, in process (the CLI test runs it one process per config)."""

from __future__ import annotations

import os

import pytest
import torch
from models import tiny_mamba, tiny_mamba2

import gsq_hf
from gsq_hf.eval.memory import measure_generate

FULL_STATE_BYTES = 2 * (64 * 8 * 4 + 64 * 4 * 4)  # Mamba: 2 layers x (SSM 64x8 + conv 64x4) in fp32


@pytest.mark.parametrize("config", [None, "int8"])
def test_measure_generate(config):
    model = tiny_mamba()
    if config:
        gsq_hf.patch(model, config)
    prompt = torch.arange(1, 9).repeat(3, 1)  # batch 3, 8 prompt tokens
    record = measure_generate(model, prompt, new_tokens=5, label=config or "unpatched")
    assert record["generated_tokens"] == 3 * 5 and record["tokens_per_second"] > 0
    assert record["peak_rss_bytes"] > 0
    if record["rss_peak_scope"] == "generate":  # Linux: the peak was reset right before generate
        assert record["generate_rss_delta_bytes"] >= 0
    assert record["peak_cuda_bytes"] is None
    expected = FULL_STATE_BYTES if config is None else 2 * (64 * (8 + 4) + 64 * 4 * 4)  # int8 codes + scale
    assert record["state_bytes"] == expected


def test_unpatched_mamba2_state_bytes():
    record = measure_generate(tiny_mamba2(), torch.ones(2, 4, dtype=torch.long), new_tokens=2, label="unpatched")
    # 2 layers x (SSM 8 heads x 8 x 8 + conv (64 + 2 groups x 2 x 8) x 4), fp32
    assert record["state_bytes"] == 2 * (8 * 8 * 8 + (64 + 32) * 4) * 4


def test_worker_threads(tmp_path, monkeypatch):
    """A worker process takes the --threads it is given, else `default_threads` of its model."""
    from gsq_hf.eval.memory import _worker

    model_dir = tmp_path / "model"
    tiny_mamba().save_pretrained(model_dir)
    monkeypatch.setattr("gsq_hf.eval.data.SMALL_MODEL_PARAMETERS", 1)  # every model is "large": default = the cores
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # this test process keeps its threads
    job = {"model": str(model_dir), "config": None, "label": "unpatched", "prompt": [1, 2, 3], "batch_size": 1,
           "new_tokens": 1, "device": "cpu", "dtype": "fp32", "seed": 0}
    for threads in (3, None):
        _worker({**job, "threads": threads})
    assert calls == [3, min(len(os.sched_getaffinity(0)), 4)]


def test_measure_configs_wants_a_model_path_and_takes_config_names():
    """Each config runs in a fresh process that loads the model: an object is refused before any process starts;
    config names resolve (and a wrong one fails) before any process starts too."""
    from gsq_hf.errors import GSQConfigError
    from gsq_hf.eval.memory import measure_configs

    options = dict(batch_size=1, new_tokens=1, device="cpu", dtype="fp32", seed=0)
    with pytest.raises(TypeError, match="pass its directory or Hub id, not a MambaForCausalLM object"):
        measure_configs(tiny_mamba(), ["int8"], [2, 3], **options)
    with pytest.raises(GSQConfigError, match="unknown preset 'int9'"):
        measure_configs("any/model", ["int9"], [2, 3], **options)
