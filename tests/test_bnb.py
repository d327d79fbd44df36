"""bitsandbytes: 8-bit and 4-bit weights with a patched model, on the CPU (bitsandbytes >= 0.50 runs both there).

transformers' own Mamba-1 forward multiplies by ``dt_proj.weight`` directly, which fails on a quantized weight;
the patched mixers call ``dt_proj(...)`` and run. With ``dt_proj`` left unquantized (``llm_int8_skip_modules``)
the unpatched model runs too, and the lossless (fp32 state) patched model must give exactly its logits.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from models import FAMILIES, VOCAB, tiny_mamba
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import gsq_hf

bnb = pytest.importorskip("bitsandbytes", reason="pip install 'gsq_hf[bnb]'")

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt. inputs will be cast:UserWarning")
SKIP_DT = ["dt_proj", "lm_head"]  # a given skip list replaces the default one (the LM head): name it again
# bitsandbytes' CPU 4-bit kernel (AVX512-BF16) needs in_features % 64 == 0 and out_features % 32 == 0
FOUR_BIT_SHAPES = {"hidden_size": 64, "intermediate_size": 128, "time_step_rank": 64, "state_size": 16}


def _ids() -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def _generate(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                          pad_token_id=0, **kwargs)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Directories of tiny random models saved with save_pretrained, by name."""
    root = tmp_path_factory.mktemp("bnb-models")
    models = {"mamba": tiny_mamba(), "mamba2": FAMILIES["mamba2"](), "mamba-4bit": tiny_mamba(**FOUR_BIT_SHAPES)}
    for name, model in models.items():
        model.save_pretrained(root / name)
    return {name: root / name for name in models}


def _load(path, **quantization):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**quantization)).eval()


def test_8bit_mamba_runs_patched_where_upstream_fails(saved):
    model = _load(saved["mamba"], load_in_8bit=True)
    dt_proj = model.backbone.layers[0].mixer.dt_proj
    assert isinstance(dt_proj, bnb.nn.Linear8bitLt) and dt_proj.weight.dtype == torch.int8
    assert not isinstance(model.lm_head, bnb.nn.Linear8bitLt)  # transformers keeps the LM head unquantized
    ids = _ids()
    with pytest.raises(RuntimeError):  # upstream: self.dt_proj.weight @ time_step on an int8 weight
        model(ids)
    gsq_hf.patch(model, "int8")
    out = _generate(model, ids, return_dict_in_generate=True)
    assert out.sequences.shape == (2, 11)
    report = out.cache.memory_report()
    fp32_weights = AutoModelForCausalLM.from_pretrained(saved["mamba"]).get_memory_footprint()
    assert report["weight_bytes"] == model.get_memory_footprint() < fp32_weights
    assert report["total_bytes"] == report["weight_bytes"] + report["state_bytes"]
    plain = gsq_hf.patch(AutoModelForCausalLM.from_pretrained(saved["mamba"]).eval(), "fp32")
    # int8 weights perturb the logits a little, not grossly
    torch.testing.assert_close(model(ids, use_cache=True).logits, plain(ids, use_cache=True).logits, atol=0.1, rtol=0)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_8bit_lossless_state_gives_the_unpatched_logits(saved, family):
    model = _load(saved[family], load_in_8bit=True, llm_int8_skip_modules=SKIP_DT)
    assert isinstance(model.backbone.layers[0].mixer.in_proj, bnb.nn.Linear8bitLt)
    ids = _ids()
    reference, tokens = model(ids).logits, _generate(model, ids)
    gsq_hf.patch(model, "fp32")
    assert torch.equal(model(ids, use_cache=True).logits, reference)
    assert torch.equal(_generate(model, ids), tokens)


def test_4bit_on_cpu(saved):
    """NF4 weights on the CPU: the patched model generates; with dt_proj unquantized it is exact."""
    model = _load(saved["mamba-4bit"], load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    assert isinstance(model.backbone.layers[0].mixer.dt_proj, bnb.nn.Linear4bit)
    gsq_hf.patch(model, "gsq-gate")
    assert _generate(model, _ids()).shape == (2, 11)
    model = _load(saved["mamba-4bit"], load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                  llm_int8_skip_modules=SKIP_DT)
    ids = _ids()
    reference, tokens = model(ids).logits, _generate(model, ids)
    gsq_hf.patch(model, "fp32")
    assert torch.equal(model(ids, use_cache=True).logits, reference)
    assert torch.equal(_generate(model, ids), tokens)


# -- the CLI ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    from test_cli import WORDS, _save  # a tiny model saved with a word-level tokenizer

    root = tmp_path_factory.mktemp("bnb-cli")
    text = root / "words.txt"
    rng = random.Random(0)
    text.write_text(" ".join(rng.choice(WORDS) for _ in range(200)))
    return {"8bit": _save(tiny_mamba(), root / "small"), "4bit": _save(tiny_mamba(**FOUR_BIT_SHAPES), root / "4bit"),
            "text": str(text)}


@pytest.mark.parametrize("flag", ["--load-in-8bit", "--load-in-4bit"])
def test_eval_with_quantized_weights(cli_model, flag, tmp_path, capsys):
    from gsq_hf.cli import main

    kind = flag.removeprefix("--load-in-")
    common = ["eval", "--model", cli_model[kind], "--dataset", cli_model["text"], "--context", "16",
              "--max-tokens", "48", "--config", "fp32", "int8", "--quiet"]
    assert main([*common, "--no-reference", "--json", str(tmp_path / "fp32.json")]) == 0
    code = main([*common, flag, "--json", str(tmp_path / "q.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    full, quantized = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("fp32", "q"))
    assert quantized["quantization"] == kind and full["quantization"] is None
    assert quantized["weight_bytes"] < full["weight_bytes"]
    int8 = quantized["results"][1]
    assert int8["weights_plus_batch_state_bytes"] == quantized["weight_bytes"] + 8 * int8["state_bytes"]
    assert int8["perplexity"] == pytest.approx(full["results"][1]["perplexity"], rel=0.05)
    assert "model weights:" in out and f"({kind})" in out
    # the unpatched reference cannot run quantized dt_proj weights: reported, not a failure of the run
    assert "not available" in quantized["reference"]["error"]


def test_4bit_layers_the_cpu_kernel_cannot_run_are_refused(cli_model, capsys):
    from gsq_hf.cli import main

    probe = bnb.nn.Linear4bit(8, 8)
    if not getattr(probe, "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes takes its generic 4-bit path, with no shape limit")
    code = main(["eval", "--model", cli_model["8bit"], "--dataset", cli_model["text"], "--context", "16",
                 "--load-in-4bit", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "needs in_features % 64 == 0 and out_features % 32 == 0" in err
    assert "x_proj (64->20)" in err


def test_missing_bitsandbytes_is_one_line(monkeypatch, cli_model, capsys):
    import sys

    from gsq_hf.cli import main

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    code = main(["eval", "--model", cli_model["8bit"], "--dataset", cli_model["text"], "--context", "16",
                 "--load-in-8bit", "--quiet"])
    assert code == 2 and "needs bitsandbytes: pip install 'gsq_hf[bnb]'" in capsys.readouterr().err


def test_quantization_flags_are_exclusive(capsys):
    from gsq_hf.cli import main

    assert main(["eval", "--load-in-8bit", "--load-in-4bit"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
