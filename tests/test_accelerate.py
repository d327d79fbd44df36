"""accelerate: patched models placed with ``device_map`` / offloaded, and evaluation sharded over processes.

Only the CPU is here: offloading to "disk" and ``cpu_offload`` exercise accelerate's hooks (weights loaded
around each module's forward, ``meta`` otherwise); several GPUs are not tested.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate import cpu_offload
from models import FAMILIES, VOCAB
from transformers import AutoModelForCausalLM

import gsq_hf
from gsq_hf.eval import TokenWindows, decode_faithful_perplexity
from gsq_hf.eval.distributed import Processes, merge_results


def _ids() -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))


def _check_close(family: str, patched: torch.Tensor, reference: torch.Tensor) -> None:
    if family == "mamba":  # bit-for-bit, as without accelerate; Mamba2 within float32 rounding of the scan
        assert torch.equal(patched, reference)
    else:
        torch.testing.assert_close(patched, reference, rtol=1e-5, atol=1e-5)


def _execution_device(mixer: torch.nn.Module) -> torch.device:
    hook = getattr(mixer, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device)
    return next(p.device for p in mixer.parameters())


def _offloaded(family: str, tmp_path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(plain model, the same weights reloaded with layers 1 and 2 offloaded to disk)."""
    plain = FAMILIES[family](num_hidden_layers=3)
    plain.save_pretrained(tmp_path / "model")
    device_map = {"backbone.embeddings": "cpu", "backbone.layers.0": "cpu", "backbone.layers.1": "disk",
                  "backbone.layers.2": "disk", "backbone.norm_f": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                 offload_folder=tmp_path / "offload").eval()
    return plain, model


def test_device_map_with_disk_offload_is_lossless(family, tmp_path):
    plain, model = _offloaded(family, tmp_path)
    mixer = model.backbone.layers[1].mixer
    assert mixer.A_log.device.type == "meta" and hasattr(mixer, "_hf_hook")  # really offloaded
    ids = _ids()
    # the unpatched offloaded model is the reference: the plain model's weights are allocated, the loaded ones
    # memory-mapped at other alignments, and oneDNN's sums can differ in the last bits between the two
    reference = model(ids).logits
    torch.testing.assert_close(reference, plain(ids).logits, rtol=1e-5, atol=1e-5)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    hooked_forward, inner = mixer.forward, mixer._old_forward
    gsq_hf.patch(model, "fp32")
    assert mixer.forward == hooked_forward and mixer._old_forward is not inner  # the hook stays, runs our step
    out = model(ids, use_cache=True)
    _check_close(family, out.logits, reference)
    for layer_idx, layer in enumerate(out.cache.gsq_layers):  # each layer's state where its layer runs
        device = _execution_device(model.backbone.layers[layer_idx].mixer)
        assert layer.storage.low.data.device == device and layer.storage.conv.data.device == device
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), expected)
    gsq_hf.unpatch(model)
    assert mixer._old_forward == inner and mixer.A_log.device.type == "meta"
    assert torch.equal(model(ids).logits, reference)


def test_cpu_offload_is_lossless(family):
    plain = FAMILIES[family]()
    model = cpu_offload(FAMILIES[family](), execution_device=torch.device("cpu"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    ids = _ids()
    gsq_hf.patch(model, "fp32")
    _check_close(family, model(ids, use_cache=True).logits, plain(ids).logits)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert out.cache.memory_report()["weight_bytes"] == model.get_memory_footprint() > 0  # meta weights count


def test_decode_faithful_eval_of_an_offloaded_model(tmp_path):
    plain, model = _offloaded("mamba", tmp_path)
    windows = TokenWindows(torch.randint(2, VOCAB, (3, 6), generator=torch.Generator().manual_seed(1)),
                           torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64))
    offloaded = decode_faithful_perplexity(model, windows, "int8", batch_size=2, progress=False)
    expected = decode_faithful_perplexity(plain, windows, "int8", batch_size=2, progress=False)
    # Not bit-for-bit: the loaded weights are memory-mapped (safetensors, offload files) at other alignments
    # than the plain model's allocated ones, and oneDNN takes other vectorized paths on them, so the NLL sum
    # differs in its last bits on some CPUs (rel 2e-8 seen). The bound leaves room for an int8 code that
    # flips on a rounding boundary; the state accounting is exact.
    assert offloaded.nll_sum == pytest.approx(expected.nll_sum, rel=1e-6) and offloaded.state == expected.state


def test_shards_merge_to_the_whole_run():
    """What the processes of a distributed run compute and gather, in one process: whole batches per shard."""
    model = FAMILIES["mamba"]()
    ids = torch.randint(2, VOCAB, (7, 6), generator=torch.Generator().manual_seed(2))
    windows = TokenWindows(ids, torch.arange(7) + 3, torch.arange(7) * 5 + 10)
    def run(windows, config, **options):
        return decode_faithful_perplexity(model, windows, config, batch_size=2, progress=False, **options)

    whole = run(windows, "gsq-entropy", reference=run(windows, "fp32", keep_reference=8).reference)
    parts = []
    for rows in (slice(0, 4), slice(4, 6), slice(6, 7)):  # each process scores its share vs its own reference
        shard = TokenWindows(ids[rows], windows.words[rows], windows.bytes[rows])
        parts.append(run(shard, "gsq-entropy", reference=run(shard, "fp32", keep_reference=8).reference))
    merged = merge_results(parts)
    assert (merged.tokens, merged.words, merged.bytes) == (whole.tokens, whole.words, whole.bytes)
    assert merged.perplexity == pytest.approx(whole.perplexity, rel=1e-12)
    assert merged.window_kl_sum == whole.window_kl_sum and merged.top1_agree == whole.top1_agree
    assert merged.kl_divergence > 0 and merged.kl_stderr == pytest.approx(whole.kl_stderr, rel=1e-12)
    assert merged.state["state_bytes"] == whole.state["state_bytes"] and merged.state["policy"] == "entropy"
    assert merged.state["avg_state_bits"] == pytest.approx(whole.state["avg_state_bits"], rel=1e-12)
    for name, fraction in whole.state["format_fractions"].items():
        assert merged.state["format_fractions"][name] == pytest.approx(fraction, rel=1e-12, abs=1e-15)
    single = Processes("cpu")  # no launcher: a no-op
    assert (single.count, single.is_main, single.shard(windows, 2)) == (1, True, windows)


def _launcher() -> list[str]:
    torchrun = shutil.which("torchrun")
    return [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow
def test_two_process_eval_equals_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m gsq_hf.cli eval`` gives the one-process numbers (gloo on the CPU)."""
    from gsq_hf.cli import main

    args = ["eval", "--max-tokens", "352", "--context", "32", "--batch-size", "2", "--device", "cpu",
            "--config", "fp32", "--config", "gsq-entropy", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*_launcher(), "--standalone", "--nproc_per_node", "2", "-m", "gsq_hf.cli", *args,
                           "--json", str(tmp_path / "two.json")], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("reference (unpatched model") == 1  # only the main process prints
    import transformers

    verbosity = transformers.logging.get_verbosity()
    try:
        assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    finally:  # main quiets transformers for its process; give other tests their default back
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["processes"], two["processes"], one["windows"], two["windows"]) == (1, 2, 11, 11)
    for a, b in zip([*one["results"], one["reference"]], [*two["results"], two["reference"]], strict=True):
        assert a["config"] == b["config"] and (a["tokens"], a["words"], a["bytes"]) == (b["tokens"], b["words"],
                                                                                        b["bytes"])
        assert b["perplexity"] == pytest.approx(a["perplexity"], rel=1e-9)
        assert b["nll_sum"] == pytest.approx(a["nll_sum"], rel=1e-9)
        if "state_bytes" in a:
            assert b["state_bytes"] == a["state_bytes"]
            assert b["avg_state_bits"] == pytest.approx(a["avg_state_bits"], rel=1e-9)
