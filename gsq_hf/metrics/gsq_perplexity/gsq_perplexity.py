# Copyright 2025 the gsq_hf authors. Licensed under the Apache License, Version 2.0.
"""Decode-faithful perplexity of a Mamba-family model whose recurrent states are stored by gsq_hf.

An `evaluate` metric module: ``evaluate.load(path_to_this_directory)`` or ``gsq_hf.metrics.load()``. The
computation is `gsq_hf.eval.perplexity.decode_faithful_perplexity`, imported from the installed package.
"""

from __future__ import annotations

import datasets
import evaluate
import torch

from gsq_hf.config import resolve_config
from gsq_hf.eval.data import DOCUMENT_SEPARATOR, load_model, load_tokenizer, make_windows
from gsq_hf.eval.perplexity import decode_faithful_perplexity, full_sequence_perplexity

_CITATION = """\
@misc{gsq_hf,
  title = {gsq_hf: quantized recurrent state for Mamba-family models in transformers},
  year = {2025},
}
"""

_DESCRIPTION = """\
Perplexity of a causal Mamba-family language model (Mamba, Mamba2 and their hybrids) whose recurrent SSM and
conv states are stored quantized by gsq_hf, measured *decode-faithfully*: every window runs through a fresh
cache with the state stored after every token, exactly as in generation (multi-token forwards whose scan stores
and re-reads the state per token; one token per forward where a policy reads the next-token distribution). A
plain full-sequence forward keeps the state in registers and would measure nothing.

The texts are joined with a blank line and cut into non-overlapping windows of `context` tokens (the short
tail is dropped). Token 0 of each window is read, not scored; tokens 1..context-1 are scored. Sums are
weighted as in lm-evaluation-harness: perplexity = exp(ΣNLL/tokens), word perplexity = exp(ΣNLL/words),
byte perplexity = exp(ΣNLL/bytes), bits per byte = ΣNLL/(bytes·ln 2), words and bytes counted on the scored
text. Lower is better for all four.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts to score, joined with a blank line before windowing.
    model (transformers model, str or None): the causal LM (an object, already on its device), a local
        directory saved by `save_pretrained`, a HuggingFace Hub model id, or None / "builtin" for the tiny Mamba
        that ships with gsq_hf. A model object is patched for the run and restored after (an already patched
        one keeps its patch).
    config (str, dict, GSQConfig, or a list of them): the state config(s): a gsq_hf preset (`gsq_hf.list_presets()`:
        "fp32", "int8", "int4", "gsq-4bit", "gsq-3bit", "gsq-gate", ...), a state format name, a YAML/JSON path, a
        dict or a `gsq_hf.GSQConfig`. Defaults to "fp32". All configs score the same windows.
    context (int): tokens per window. Defaults to 512.
    batch_size (int): windows run at once. Defaults to 8.
    max_tokens (int): score only the first `max_tokens` tokens of the joined text. Defaults to None (all).
    tokenizer (tokenizer): the model's tokenizer; needed only when `model` is an object whose `name_or_path`
        has no tokenizer.
    device (str): where a model loaded from a path runs. Defaults to "cuda" when available, else "cpu".
    dtype (str): "fp32", "bf16" or "fp16", for a model loaded from a path. Defaults to "fp32".
    reference (bool): also compute the unpatched model's full-sequence perplexity on the same windows.
        Defaults to False.
    progress (bool): show progress bars. Defaults to False.
Returns:
    config (str, or list of str): the config name(s).
    perplexity, word_perplexity, byte_perplexity, bits_per_byte (float, or list of float, one per config).
    avg_state_bits (float or list): average stored bits per SSM state element, scales included.
    state_bytes, full_precision_state_bytes (int or list): state bytes per sequence under the config, and in
        transformers' own cache.
    tokens (int): tokens scored (the same for every config).
    reference_perplexity (float): the unpatched full-sequence perplexity, only when `reference=True`.
    A single config (not in a list) gives scalars; a list of configs gives lists in the same order.
Examples:
    >>> import gsq_hf.metrics
    >>> metric = gsq_hf.metrics.load()                   # or evaluate.load(str(gsq_hf.metrics.GSQ_PERPLEXITY))
    >>> texts = ["The class statement defines a class.", "A for loop runs its body for each item."]
    >>> results = metric.compute(predictions=texts, model="builtin", config=["fp32", "int4"], context=8)
    >>> print(results["config"], [round(p, 1) for p in results["perplexity"]])  # doctest: +SKIP
    ['fp32', 'int4'] [...]
"""

_PER_CONFIG = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "avg_state_bits", "state_bytes",
               "full_precision_state_bytes")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GsqPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(self, predictions, model=None, config="fp32", context=512, batch_size=8, max_tokens=None,
                 tokenizer=None, device=None, dtype="fp32", reference=False, progress=False):
        model, tokenizer = _model_and_tokenizer(model, tokenizer, device, dtype)
        windows = make_windows(tokenizer, DOCUMENT_SEPARATOR.join(predictions), context, max_tokens)
        single = not isinstance(config, (list, tuple))
        configs = [resolve_config(c) for c in ([config] if single else config)]
        records = [decode_faithful_perplexity(model, windows, cfg, batch_size=batch_size, progress=progress).to_dict()
                   for cfg in configs]
        output = {"config": [r["config"] for r in records]}
        output.update({key: [r[key] for r in records] for key in _PER_CONFIG})
        if single:
            output = {key: values[0] for key, values in output.items()}
        output["tokens"] = windows.scored_tokens
        if reference:
            output["reference_perplexity"] = full_sequence_perplexity(
                model, windows, batch_size=batch_size, progress=progress).perplexity
        return output


def _model_and_tokenizer(model, tokenizer, device, dtype):
    if model is None or isinstance(model, str) and model == "builtin":
        from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR

        model = str(BUILTIN_MODEL_DIR)
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
            if not source:
                raise ValueError("pass tokenizer=... with a model object that was not loaded from a path")
            tokenizer = load_tokenizer(source)
        return model, tokenizer
    source = str(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(source, dtype, device), tokenizer if tokenizer is not None else load_tokenizer(source)
