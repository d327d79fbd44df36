"""``gsq-hf memory``: peak memory of a real ``generate`` for each config, patched vs unpatched, in one run.

How and why: every config runs in a fresh Python process (``python -m gsq_hf.eval.memory``), which loads
the model, patches it (or not, for the ``unpatched`` row), then measures one ``generate`` call:

* CPU: the process's resident-set high-water mark (``VmHWM``) is reset right before ``generate`` by
  writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0) and read right after. ``peak_rss_bytes`` is
  that peak (model included); ``generate_rss_delta_bytes`` is the peak minus the RSS just before
  ``generate``: what generation needed on top of the loaded model. Where the reset is not allowed the
  peak since process start (``ru_maxrss``) is reported instead and ``rss_peak_scope`` says ``"process"``.
* CUDA: ``torch.cuda.reset_peak_memory_stats`` before, ``max_memory_allocated`` after (and the delta over
  ``memory_allocated`` before).

One process per config because in-process measures cannot separate configs: ``ru_maxrss`` only ever
grows, the allocator keeps freed pages of earlier configs, and ``tracemalloc`` does not see tensor memory
(torch allocates outside Python's allocator). ``state_bytes`` (per sequence) is exact and noise-free: the
`GSQCache` report for patched configs, the tensors of transformers' own cache for ``unpatched``. RSS of a
tiny model is dominated by the Python/torch runtime, so RSS differences there are noise; on real models
and batch sizes the state shows. To tell which, the unpatched run is measured twice (first and last): the
difference of its two peaks, and the peak difference of any config storing the unpatched state bytes (fp32), is
the resolution below which a peak difference says nothing about the state (`gsq_hf.eval.report.peak_resolution`).
"""

from __future__ import annotations

import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .._compat import output_cache
from ..cache import GSQCache, weight_bytes
from ..config import GSQConfig, resolve_config
from ..patch import patch
from .data import default_threads, load_model

__all__ = ["UNPATCHED", "measure_configs", "measure_generate"]

UNPATCHED = "unpatched"
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _plain_state_bytes(cache) -> int:
    """Bytes of the conv and recurrent state tensors in a transformers cache (the unpatched model's)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("conv_states", "recurrent_states"):
            states = getattr(layer, name, None) or {}
            values = states.values() if isinstance(states, dict) else states
            total += sum(t.numel() * t.element_size() for t in values if isinstance(t, torch.Tensor))
    return total


def measure_generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, label: str) -> dict[str, Any]:
    """Peak memory and state size of ``model.generate`` from ``prompt`` (batch, tokens), in this process.

    Meant for a fresh process (see the module docstring); exactly ``new_tokens`` tokens are generated
    greedily (end-of-sequence is ignored until then) so every config does the same work.
    """
    device = prompt.device
    cuda = device.type == "cuda"
    attention_mask = torch.ones_like(prompt)
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_before = torch.cuda.memory_allocated(device)
    rss_before = _status_bytes("VmRSS")
    scoped = _reset_rss_peak() and rss_before is not None
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(input_ids=prompt, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                                pad_token_id=model.config.pad_token_id or 0)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM") if scoped else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cache = output_cache(output)
    batch = prompt.shape[0]
    if isinstance(cache, GSQCache):
        report = cache.memory_report()
        state = {"state_bytes": report["state_bytes"] / batch, "avg_state_bits": report["avg_state_bits"],
                 "full_precision_state_bytes": report["full_precision_state_bytes"] / batch}
    else:
        state = {"state_bytes": _plain_state_bytes(cache) / batch}
    generated = (output.sequences.shape[1] - prompt.shape[1]) * batch
    return {
        "config": label,
        "weight_bytes": weight_bytes(model),
        "peak_rss_bytes": peak,
        "generate_rss_delta_bytes": peak - rss_before if scoped else None,
        "rss_peak_scope": "generate" if scoped else "process",
        "peak_cuda_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "generate_cuda_delta_bytes": torch.cuda.max_memory_allocated(device) - cuda_before if cuda else None,
        "generated_tokens": generated,
        "seconds": seconds,
        "tokens_per_second": generated / seconds,
        **state,
    }


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(job["seed"])
    model = load_model(job["model"], job["dtype"], job["device"], quantization=job.get("quantization"),
                       device_map=job.get("device_map"))
    torch.set_num_threads(job.get("threads") or default_threads(model))
    if job["config"] is not None:
        patch(model, GSQConfig.from_dict(job["config"]))
    prompt = torch.tensor(job["prompt"], device=job["device"]).repeat(job["batch_size"], 1)
    return {**measure_generate(model, prompt, job["new_tokens"], job["label"]), "threads": torch.get_num_threads()}


def measure_configs(
    model: str | Path,
    configs: list[GSQConfig | str | dict],
    prompt: list[int],
    *,
    batch_size: int,
    new_tokens: int,
    device: str,
    dtype: str,
    seed: int,
    quantization: str | None = None,
    device_map: str | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """One record per config, ``unpatched`` first, each measured in its own fresh process, and a last
    ``unpatched`` record (``"repeat": True``) measured again after them all.

    The two unpatched runs differ only by noise (allocator, page cache, drift of the machine): their
    difference is the resolution of a peak (`gsq_hf.eval.report.peak_resolution`). ``threads``: intra-op
    threads of each process (None: `default_threads` of the model). A config whose process fails gets
    ``{"config", "error"}`` (the last line the process wrote to stderr). ``model``: a saved directory or Hub id
    (each process loads it: a model object cannot cross into one); ``configs``: anything `resolve_config` takes.
    """
    if not isinstance(model, (str, Path)):
        raise TypeError(f"measure_configs measures each config in a fresh process, which loads the model itself: "
                        f"pass its directory or Hub id, not a {type(model).__name__} object")
    configs = [resolve_config(cfg) for cfg in configs]
    records = []
    jobs = [(UNPATCHED, None), *((cfg.name, cfg.to_dict()) for cfg in configs), (UNPATCHED, None)]
    for label, config in jobs:
        job = {"model": str(model), "config": config, "label": label, "prompt": prompt, "batch_size": batch_size,
               "new_tokens": new_tokens, "device": device, "dtype": dtype, "seed": seed,
               "quantization": quantization, "device_map": device_map, "threads": threads}
        done = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(job), capture_output=True,
                              text=True, check=False)
        if done.returncode == 0:
            records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            lines = done.stderr.strip().splitlines() or [f"worker exited with code {done.returncode}"]
            records.append({"config": label, "error": lines[-1]})
    records[-1]["repeat"] = True
    return records


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.stdin.read()))))
