"""What an evaluation reads: the text, the token windows cut from it, and the model with its tokenizer.

Text sources (``--dataset``), tried in this order:

* ``None`` or ``"builtin"``: the held-out split of the stdlib's pydoc topics (`gsq_hf.eval.builtin`), so
  that ``gsq-hf eval`` runs offline with no arguments;
* an existing local path: a text file (``.txt``, ``.raw``, anything not ``.jsonl``), a JSONL file with one
  ``{"text": ...}`` object per line, or a directory of ``.txt``/``.raw`` files (see `_directory_files`);
* anything else is a HuggingFace Hub dataset id, ``name`` or ``name:config``, loaded with
  ``datasets.load_dataset(name, config, split=split)`` as online users expect.

Documents (JSONL lines, files of a directory, rows of a hub split) are joined with a blank line, as the
HuggingFace perplexity guide does for WikiText. Bad input raises an `EvalInputError` whose message names
what was wrong and what is accepted; the CLI turns it into a one-line error and exit code 2.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..locations import ACCEPTED_MODELS, HUB_ID, model_path_problem

__all__ = [
    "BUILTIN_DATASET",
    "DatasetNotFoundError",
    "EvalInputError",
    "ModelNotFoundError",
    "QUANTIZATIONS",
    "TokenWindows",
    "bnb_config",
    "check_model_source",
    "default_threads",
    "load_model",
    "load_text",
    "load_tokenizer",
    "make_windows",
]

BUILTIN_DATASET = "builtin"
TEXT_SUFFIXES = (".txt", ".raw")
SPLIT_WORDS = {"train", "test", "valid", "validation", "dev"}
SPLIT_ALIASES = {"validation": {"validation", "valid", "dev"}, "valid": {"validation", "valid", "dev"}}
DOCUMENT_SEPARATOR = "\n\n"
# Tokens dropped before the end of a tokenized prefix: BPE/WordPiece segmentation only looks ahead within
# the current pre-token, so tokens this far from the cut equal those of the whole text.
_CUT_MARGIN = 64
ACCEPTED_DATASETS = (
    "'builtin' (the default), a local .txt/.raw file, a local .jsonl file with a 'text' field, "
    "a local directory of .txt/.raw files, or a HuggingFace Hub dataset id 'name' or 'name:config'"
)


class EvalInputError(ValueError):
    """An evaluation input (dataset, model, text, window size) is not usable; the message says why."""


class DatasetNotFoundError(EvalInputError):
    """``--dataset`` names no readable local path and no loadable Hub dataset."""


class ModelNotFoundError(EvalInputError):
    """``--model`` names no local model directory and no loadable Hub model."""


# -- text ---------------------------------------------------------------------------------------------
def load_text(source: str | None, split: str = "test") -> str:
    """The evaluation text of ``source`` (see the module docstring for what is accepted)."""
    if source is None or source == BUILTIN_DATASET:
        return _builtin_text(split)
    path = Path(source).expanduser()
    if path.is_dir():
        return _not_blank(DOCUMENT_SEPARATOR.join(_read_file(f) for f in _directory_files(path, split)), path)
    if path.is_file():
        return _not_blank(_read_file(path), path)
    if not HUB_ID.match(source.split(":", 1)[0]) or path.suffix in (*TEXT_SUFFIXES, ".jsonl", ".json"):
        raise DatasetNotFoundError(f"dataset path {source!r} does not exist; accepted: {ACCEPTED_DATASETS}")
    return _hub_text(source, split)


def _builtin_text(split: str) -> str:
    from .builtin import builtin_text

    try:
        return builtin_text(split)
    except ValueError as error:
        raise DatasetNotFoundError(f"the built-in dataset has no split {split!r}: {error}") from None


def _not_blank(text: str, path: Path) -> str:
    """``text``, unless it is blank: say which file or directory was empty, not only that the text is."""
    if not text.strip():
        raise EvalInputError(f"the evaluation text is empty: dataset {str(path)!r} holds only whitespace; "
                             "give a file or directory with some text in it")
    return text


def _read_utf8(path: Path) -> str:
    """The text of a dataset file; a binary file (weights, an image) is named, not a UnicodeDecodeError."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise EvalInputError(f"dataset file {str(path)!r} is not UTF-8 text (byte 0x{error.object[error.start]:02x} "
                             f"at offset {error.start}); accepted: {ACCEPTED_DATASETS}") from None
    except OSError as error:
        raise EvalInputError(f"dataset file {str(path)!r} cannot be read ({error.strerror}); "
                             f"accepted: {ACCEPTED_DATASETS}") from None


def _read_file(path: Path) -> str:
    if path.suffix != ".jsonl":
        return _read_utf8(path)
    documents = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise EvalInputError(f"{path}:{number} is not valid JSON ({error.msg}); a JSONL dataset has one "
                                 '{"text": "..."} object per line') from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise EvalInputError(f'{path}:{number} has no string "text" field; a JSONL dataset has one '
                                 '{"text": "..."} object per line')
        documents.append(record["text"])
    return DOCUMENT_SEPARATOR.join(documents)


def _directory_files(directory: Path, split: str) -> list[Path]:
    """The ``.txt``/``.raw`` files of ``directory`` (sorted) that belong to ``split``.

    A file belongs to a split when a dot/underscore/hyphen-separated part of its name is the split
    (``wiki.test.raw``, ``ptb.test.txt``; ``valid``/``validation``/``dev`` are one split). A directory whose
    file names carry no split word at all is one document collection: every file is read.
    """
    files = sorted(f for f in directory.iterdir() if f.is_file() and f.suffix in TEXT_SUFFIXES)
    if not files:
        raise DatasetNotFoundError(f"directory {str(directory)!r} holds no .txt or .raw file; "
                                   f"accepted: {ACCEPTED_DATASETS}")
    parts = {f: set(re.split(r"[._-]", f.stem.lower())) for f in files}
    wanted = SPLIT_ALIASES.get(split, {split})
    matching = [f for f in files if parts[f] & wanted]
    if matching:
        return matching
    if not any(p & SPLIT_WORDS for p in parts.values()):
        return files
    available = sorted(set().union(*parts.values()) & SPLIT_WORDS)
    raise DatasetNotFoundError(f"directory {str(directory)!r} has no file for split {split!r}; "
                               f"its files are for split(s): {', '.join(available)}")


def _hub_text(source: str, split: str) -> str:
    import datasets

    name, _, config = source.partition(":")
    try:
        data = datasets.load_dataset(name, config or None, split=split)
    except Exception as error:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DatasetNotFoundError(f"could not load Hub dataset {source!r} split {split!r} ({reason}); "
                                   f"accepted: {ACCEPTED_DATASETS}") from error
    columns = [c for c, f in data.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if not columns:
        raise EvalInputError(f"Hub dataset {source!r} has no text column; its columns: {', '.join(data.features)}")
    return DOCUMENT_SEPARATOR.join(data["text" if "text" in columns else columns[0]])


# -- windows ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenWindows:
    """Non-overlapping windows of ``context`` tokens, with the size of the text each window scores.

    ``ids`` is ``(windows, context)``. Token 0 of a window is only read (nothing predicts it from inside the
    window); tokens ``1..context-1`` are scored. ``words``/``bytes`` (``(windows,)``) count words (as
    lm-eval does, see `from_ids`) and UTF-8 bytes of the decoded scored tokens, the denominators of word/byte
    perplexity.
    """

    ids: torch.Tensor
    words: torch.Tensor
    bytes: torch.Tensor

    @property
    def context(self) -> int:
        return self.ids.shape[1]

    @property
    def scored_tokens(self) -> int:
        return self.ids.shape[0] * (self.context - 1)

    @classmethod
    def from_ids(cls, ids: torch.Tensor, tokenizer) -> TokenWindows:
        r"""Windows from an ``(windows, context)`` id tensor; ``tokenizer`` decodes the scored tokens.

        Words are counted as lm-evaluation-harness counts them (``Task.count_words``), so that word
        perplexities compare: ``len(re.split(r"\s+", text))``, which also counts the empty piece before
        leading and after trailing whitespace (``" a b "`` is 4 words, ``""`` is 1). lm-eval counts each
        document; here each window's scored text is counted on its own.
        """
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise EvalInputError(f"token windows must be (windows, context >= 2), got shape {tuple(ids.shape)}")
        texts = tokenizer.batch_decode(ids[:, 1:].tolist(), skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        words = torch.tensor([len(re.split(r"\s+", t)) for t in texts], dtype=torch.int64)
        nbytes = torch.tensor([len(t.encode("utf-8")) for t in texts], dtype=torch.int64)
        return cls(ids.to(torch.int64), words, nbytes)


def make_windows(tokenizer, text: str, context: int, max_tokens: int | None = None,
                 what: str = "context") -> TokenWindows:
    """Tokenize ``text`` once (no special tokens) and cut it into ``len // context`` windows.

    Only the first ``max_tokens`` tokens are used when given; the tail shorter than ``context`` is dropped,
    so every window has the same length and every config sees the same windows. ``what``: the window length's
    name in a text too short's error (the option a user set).
    """
    if not isinstance(context, int) or context < 2:
        raise EvalInputError(f"context must be an integer >= 2 (one token read, at least one scored), got {context}")
    if max_tokens is not None and max_tokens < 2:
        raise EvalInputError(f"max_tokens must be an integer >= 2 or None (all tokens), got {max_tokens}")
    if not text.strip():
        raise EvalInputError("the evaluation text is empty; give a dataset with some text in it")
    ids = _tokenize(tokenizer, text, max_tokens)
    count = len(ids) // context
    if count == 0:
        limit = f" (after --max-tokens {max_tokens})" if max_tokens is not None and len(ids) == max_tokens else ""
        raise EvalInputError(f"{what} {context} is longer than the text's {len(ids)} tokens{limit}; "
                             f"use a {what} of at most {len(ids)} or more text")
    return TokenWindows.from_ids(torch.tensor(ids[: count * context]).view(count, context), tokenizer)


def _tokenize(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    """Token ids of ``text``, or of its first ``max_tokens`` tokens without tokenizing all of it.

    With ``max_tokens``, growing prefixes are tokenized until one yields ``_CUT_MARGIN`` tokens more than
    needed: a corpus of hundreds of MB is not tokenized to evaluate its first few thousand tokens.
    """
    def encode(part: str) -> list[int]:
        return tokenizer.encode(part, add_special_tokens=False, verbose=False)

    if max_tokens is None:
        return encode(text)
    chars = 8 * (max_tokens + _CUT_MARGIN)
    while True:
        ids = encode(text[:chars])
        if chars >= len(text) or len(ids) >= max_tokens + _CUT_MARGIN:
            return ids[:max_tokens]
        chars *= 2


# -- model --------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PROBE = "hello world"  # any real tokenizer turns this into some tokens (if only unknown-token ids)


def _model_location(source: str | Path) -> str:
    """A local model directory, or a string that can be a Hub id."""
    problem = model_path_problem(source)
    if problem is not None:
        raise ModelNotFoundError(f"{problem}; accepted: {ACCEPTED_MODELS}")
    path = Path(str(source)).expanduser()
    return str(path) if path.is_dir() else str(source)


def _loading(source: str | Path, load):
    """Run ``load(location)``, turning transformers' missing-file/unreachable-Hub errors into one line."""
    location = _model_location(source)
    try:
        return load(location)
    except (OSError, ValueError) as error:  # transformers reports missing or unreachable files as OSError
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        kind = "local directory" if Path(location).is_dir() else ("Hub model id (unknown id, or Hub unreachable? "
                                                                   "HF_HUB_OFFLINE=1 fails at once without retries)")
        raise ModelNotFoundError(f"could not load model {str(source)!r} as a {kind}: {reason}; "
                                 f"accepted: {ACCEPTED_MODELS}") from error


@functools.lru_cache(maxsize=16)  # the CLI loads a model's tokenizer and weights: one check, not two
def check_model_source(source: str | Path) -> str:
    """The location of a model gsq_hf can patch (a local directory or a Hub id), judged from config.json alone.

    `load_tokenizer` and `load_model` run it first, so that a model of another architecture is refused with
    `UnsupportedModelError` before its tokenizer or weights are read: the model is built on the ``meta``
    device (no memory, no weights) and checked as `gsq_hf.patch` would check it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..errors import UnsupportedModelError
    from ..patch import patchable_mixers

    config = _loading(source, AutoConfig.from_pretrained)
    with torch.device("meta"):
        skeleton = _loading(source, lambda _: AutoModelForCausalLM.from_config(config))
    try:
        patchable_mixers(skeleton)
    except UnsupportedModelError as error:  # name the --model value, not only its class
        raise UnsupportedModelError(f"model {str(source)!r}: {error}") from None
    return _model_location(source)


def load_tokenizer(source: str | Path):
    """The tokenizer saved with the model at ``source`` (a local directory or a Hub id)."""
    from transformers import AutoTokenizer

    check_model_source(source)
    tokenizer = _loading(source, AutoTokenizer.from_pretrained)
    if not tokenizer.encode(_PROBE, add_special_tokens=False):  # no tokenizer files: an empty vocabulary
        raise EvalInputError(f"model {str(source)!r} has no tokenizer (no tokenizer files are saved with it, so "
                             "text encodes to no tokens); accepted: a model directory with its tokenizer saved in "
                             "it (tokenizer.save_pretrained(DIR)), or a Hub model id that has one")
    return tokenizer


# Below this many parameters a model's per-token ops (a few small matmuls per layer) are too small to share
# between threads. Measured on a 2-core CPU shared with other jobs (load 1.3-3.4): `gsq-hf eval --config int8
# --max-tokens 2048` on the built-in model took 7-14 s with 1 thread, 7-51 s with 2; the default eval 75 s vs
# 116 s; decode-faithful int8 on a random 129M Mamba 5.9-6.8 s vs 15-19 s.
SMALL_MODEL_PARAMETERS = 200_000_000


def default_threads(model: torch.nn.Module) -> int:
    """Intra-op CPU threads for evaluating ``model``: 1 below `SMALL_MODEL_PARAMETERS` (tiny per-token ops only
    contend, and slow down many-fold when other jobs share the cores), else min(available cores, 4)."""
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 4)


QUANTIZATIONS = ("8bit", "4bit")


def bnb_config(quantization: str, dtype: str = "fp32"):
    """The `transformers.BitsAndBytesConfig` of ``--load-in-8bit`` / ``--load-in-4bit``.

    bitsandbytes' defaults otherwise: the LM head (and tied embeddings) stay unquantized; 4-bit computes in
    ``dtype`` (its default, fp32, is slow) with NF4 weights.
    """
    from transformers import BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise EvalInputError(f"quantization {quantization!r} is not accepted; choose one of: "
                             f"{', '.join(QUANTIZATIONS)}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise EvalInputError(f"loading weights in {quantization} needs bitsandbytes: "
                             "pip install 'gsq_hf[bnb]'") from None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[dtype])


def load_model(source: str | Path, dtype: str = "fp32", device: str | torch.device = "cpu", *,
               quantization: str | None = None, device_map: str | dict | None = None) -> torch.nn.Module:
    """The causal LM at ``source`` in ``dtype`` (fp32, bf16, fp16), in eval mode on ``device``.

    ``quantization`` (``"8bit"``, ``"4bit"``) loads the linear layers' weights with bitsandbytes (the model
    is then placed with ``device_map={"": device}``: a bitsandbytes model cannot be moved after loading).
    ``device_map`` (e.g. ``"auto"``, or a dict with ``"cpu"``/``"disk"`` entries) lets accelerate place the
    layers (over several devices, offloading what does not fit) instead of ``device``.
    """
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise EvalInputError(f"dtype {dtype!r} is not accepted; choose one of: {', '.join(DTYPES)}")
    options: dict = {"dtype": DTYPES[dtype]}
    if quantization is not None:
        options["quantization_config"] = bnb_config(quantization, dtype)
        options["device_map"] = {"": str(device)}
    if device_map is not None:
        options["device_map"] = device_map
    check_model_source(source)
    model = _loading(source, lambda location: AutoModelForCausalLM.from_pretrained(location, **options))
    if quantization == "4bit":
        _check_bnb_cpu_4bit(model)
    return (model if "device_map" in options else model.to(device)).eval()


def _check_bnb_cpu_4bit(model: torch.nn.Module) -> None:
    """Refuse 4-bit layers that bitsandbytes' CPU kernel cannot run, before a run fails deep inside it.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks each 4-bit weight at its first inference call;
    the repacking needs out_features % 32 == 0 and in_features % 64 (the quantization block) == 0, and
    fails otherwise. Other CPUs and GPUs take another path without this constraint.
    """
    import bitsandbytes as bnb

    bad = [f"{name} ({module.in_features}->{module.out_features})" for name, module in model.named_modules()
           if isinstance(module, bnb.nn.Linear4bit) and module.weight.device.type == "cpu"
           and getattr(module, "support_avx512bf16_for_cpu", False)
           and (module.out_features % 32 or module.in_features % 64)]
    if bad:
        more = " ..." if len(bad) > 4 else ""
        raise EvalInputError(f"bitsandbytes' 4-bit CPU kernel needs in_features % 64 == 0 and out_features % 32 "
                             f"== 0, which {len(bad)} layer(s) do not meet: {', '.join(bad[:4])}{more}; run 4-bit "
                             "on a GPU, or use --load-in-8bit on the CPU")
