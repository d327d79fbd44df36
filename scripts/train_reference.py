"""Train a reference Mamba / Mamba2 language model on the local Wikipedia corpus.

The model is a transformers ``MambaForCausalLM`` (``--family mamba``) or ``Mamba2ForCausalLM``
(``--family mamba2``) built from a config, trained from scratch on ``../shared/data/train-corpus/``
(English Wikipedia, WikiExtractor format; the ``<doc …>``/``</doc>`` lines are dropped) with one of two
tokenizers (``--tokenizer``; eos ``<|endoftext|>`` = 0 and pad ``<|padding|>`` = 1 in both):

* ``bpe8k`` (the cpu preset): an 8192-token byte-level BPE trained here with the ``tokenizers`` library on the
  training articles of the corpus slice (never the held-out articles, nor any evaluation text): GPT-2's
  byte-level pre-tokenizer (no prefix space) and decoder, no normalizer, all 256 bytes in the initial alphabet,
  ``min_frequency`` 2 (``BPE_SETTINGS``). Any text (WikiText, PTB, LAMBADA) encodes without unknown tokens and
  decodes back byte for byte. Deterministic: the same slice and settings give a byte-identical
  ``tokenizer.json`` (the two runs below trained the same one). About 11 s for the whole corpus, cached as
  ``tokenizer-bpe8k-<key>.json`` beside ``tokens-*.pt`` (key: a hash of the corpus files, the slice and the
  settings); the token cache stores the tokenizer too, so ``--tokens`` alone is enough elsewhere. ``vocab_size``
  is the tokenizer's size rounded up to a multiple of 8 (8192). WikiText-2 test is 347k tokens with it (3.72
  bytes a token) against 287k with GPT-NeoX (4.49): per-token perplexities of the two do not compare, bits per
  byte do (``training_info.json`` has both).
* ``gpt-neox`` (the gpu preset): the GPT-NeoX-20B tokenizer, ``vocab_size`` padded to 50280 as the
  state-spaces/mamba-*-hf configs do.

The output directory holds a ``save_pretrained`` model and its tokenizer (a ``PreTrainedTokenizerFast``) that
``AutoModelForCausalLM.from_pretrained(dir)``, ``AutoTokenizer.from_pretrained(dir)`` and ``gsq-hf eval --model
dir`` load.

Usage, from the repository root with the package importable (``pip install -e .`` or ``PYTHONPATH=.``)::

    python scripts/train_reference.py --family mamba --preset cpu --output-dir runs/mamba-cpu
    python scripts/train_reference.py --family mamba2 --preset gpu --output-dir runs/mamba2-gpu
    python scripts/train_reference.py --family mamba --preset cpu --output-dir runs/mamba-cpu --resume --steps 2000

Presets (every value can be overridden by its flag):

* ``cpu``: bpe8k, hidden 256, 4 layers, d_state 16, batch 8 x 256 tokens, lr 3e-3, 35 minutes: Mamba 3.85M
  parameters, Mamba2 3.73M, 54% / 56% of them the tied 8192 x 256 embedding (with GPT-NeoX's 50k vocabulary it
  was 14.6M, 88% embedding, and the LM head dominated a step). Fits <= 45 minutes on 2 cores with the tokenizer
  (11-40 s), tokenization (20-60 s) and evaluation. Step times (forward, backward, AdamW; 1 thread, the other
  core busy; 3 steps), Mamba / Mamba2, 8k vocabulary: hidden 256 x 4 layers 1.50 / 1.37 s, 384 x 4 2.23 / 2.08
  s, 256 x 8 2.65 / 2.34 s, 384 x 6 3.34 / 2.89 s, 512 x 4 3.62 / 2.83 s; the old 50k 256 x 4 4.68 / 4.50 s at
  the same moment (Mamba alone: ``python scripts/training_scan.py --hidden 256 --layers 4 --d-state 16 --batch
  8 --length 256 --vocab 8192 --steps 3``, 1.85 s; 384 x 6: 3.45 s). The shape stays 256 x 4: in a 10-minute
  head-to-head (Mamba, both at once on a machine shared with two other jobs) 256 x 4 ran 173 steps to held-out
  loss 6.69 and 384 x 6 84 steps to 7.32 (it was behind per step too); at this budget the models are bound by
  tokens seen, so the smaller vocabulary buys steps rather than layers. Outcome (35 min, ``--threads 1``, both
  families side by side; the machine was shared, so a step took 1.82 s / 1.56 s on average): Mamba 1157 steps,
  2.37M tokens, held-out loss 5.247 (2.03 bits/byte), WikiText-2 token perplexity 499.3, word 5113, 2.396
  bits/byte; Mamba2 1352 steps, 2.77M tokens, held-out 5.105 (1.98 bits/byte), WikiText-2 478.0, word 4816,
  2.379 bits/byte. The GPT-NeoX cpu preset before it (``--tokenizer gpt-neox``; Mamba 3.3 s a step: 643 steps,
  1.32M tokens, held-out 6.36 = 2.06 bits/byte, WikiText-2 1845 per token = 2.436 bits/byte; Mamba2 3.5 s: 595
  steps, 1.22M tokens, 6.40 = 2.07, 1889 = 2.443 bits/byte; its bits per byte derived from those losses and the
  bytes its tokens cover): per byte the 8k models are 1.5-4.6% better, with twice the tokens seen, and still far
  from converged (NLL on WikiText-2 falls only from ~6.4 at window positions 1-4 to ~6.2 after 64). Wall time
  37 minutes a run.
* ``gpu``: hidden 256, 6 layers (d_state 16 for Mamba, 64 for Mamba2), batch 32 x 512, bf16 autocast,
  4.5 minutes: 15.5M parameters (29.6 MiB in bf16) each, so that both families come back from one device call
  (<= 64 MiB in <= 8 files of <= 16 MiB; one model alone could be hidden 384 x 8 = 27.0M, 51.5 MiB).
  ``scripts/device_run.sh`` is that call: both families on one GPU.
  The machine has no corpus: tokenize here once (any run writes ``tokens-*.pt`` into ``--cache-dir``), carry
  that file and the tokenizer/WikiText files (``--data-dir``), and train with ``--tokens``. The tied
  embedding alone is 50280 x hidden x 2 bytes (38.6 MB), one tensor that ``max_shard_size`` cannot split:
  pack the saved directory into <= 15 MiB parts::

      python scripts/train_reference.py --family mamba --preset gpu --output-dir run/m --data-dir gpu_data \
          --tokens gpu_data/tokens.pt --checkpoint-dir /tmp/ckpt && tar -C run -cf - m | split -b 15m - $OUT/m.tar.part-
      cat m.tar.part-* | tar -xf -          # back on this machine: run/m again, loadable as saved

Mamba trains with ``scripts/training_scan.py``'s sequential scan on CPU (``--scan auto``; 4.46 s a step of the
old 50k-vocabulary cpu preset against 8.98 s with the ``mambapy`` parallel scan, 1 thread on a loaded machine:
``python scripts/training_scan.py --hidden 256 --layers 4 --d-state 16 --batch 8 --length 256 --vocab 50280
--steps 3``; with ``--vocab 8192`` 1.85 s against 5.53 s)
and with ``mambapy`` on a GPU; Mamba2 with transformers' chunked torch path. The saved config has
``use_mambapy=False``. The tokenized corpus is cached (``tokens-*.pt``) in
``--cache-dir`` (default: the output directory). A checkpoint (model, optimizer, scheduler, step, RNG states)
is written every ``--checkpoint-every`` steps and at the end to ``<output>/checkpoint/``; ``--resume``
continues from it up to ``--steps`` / ``--minutes`` in total. Training stops at whichever of ``--steps`` and
``--minutes`` comes first; the warmup + cosine schedule follows whichever is further along.
At the end the saved model is reloaded and scored on WikiText-2 raw test (token and word perplexity, bits per
byte; a short token budget) with ``gsq_hf.eval.make_windows`` + ``full_sequence_perplexity``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedTokenizerFast,
)

from gsq_hf.cli.common import positive, run_script
from gsq_hf.eval import full_sequence_perplexity, make_windows  # imported first: a missing package fails at start

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts/training_scan.py
from training_scan import SCAN_CHOICES, resolve_scan, training_scan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TOKENIZER_FILE = Path("tokenizers") / "gpt-neox-20b" / "tokenizer.json"  # under --data-dir
WIKITEXT_TEST = Path("wikitext-2-raw") / "wiki.test.raw"
EOS, PAD = "<|endoftext|>", "<|padding|>"
VOCAB_SIZE = 50280  # GPT-NeoX's 50277 entries padded as in the state-spaces/mamba-*-hf configs
TOKENIZERS = ("gpt-neox", "bpe8k")
# bpe8k: a byte-level BPE trained here on the training articles. Fixed settings, so the same corpus slice gives
# the same tokenizer (the trainer breaks ties by pair, not by hash order); changing any of them changes the cache key.
BPE_SETTINGS = {"vocab_size": 8192, "min_frequency": 2, "special_tokens": [EOS, PAD], "add_prefix_space": False,
                "initial_alphabet": "byte-level (all 256 bytes)", "version": 1}
WARMUP = 0.05  # fraction of training
# The published mamba-130m WikiText-2 perplexity, printed for context. No source for it was found in the
# offline reference material (the Mamba paper reports Pile perplexity, not WikiText-2), so none is claimed.
PUBLISHED_MAMBA_130M_WIKITEXT2 = "not available offline"

PRESETS: dict[str, dict] = {
    "cpu": dict(tokenizer="bpe8k", hidden=256, layers=4, d_state={"mamba": 16, "mamba2": 16}, steps=100_000,
                minutes=35.0, batch_size=8, seq_len=256, lr=3e-3, bf16=False, eval_every=25, val_tokens=8_192,
                checkpoint_every=25, wikitext_tokens=8_192, wikitext_context=256, eval_batch_size=8),
    "gpu": dict(tokenizer="gpt-neox", hidden=256, layers=6, d_state={"mamba": 16, "mamba2": 64}, steps=100_000,
                minutes=4.5, batch_size=32, seq_len=512, lr=2e-3, bf16=True, eval_every=100, val_tokens=65_536,
                checkpoint_every=200, wikitext_tokens=65_536, wikitext_context=512, eval_batch_size=16),
}


# -- data -----------------------------------------------------------------------------------------------
def load_tokenizer(tokenizer_file: Path) -> PreTrainedTokenizerFast:
    """The GPT-NeoX-20B tokenizer (``--tokenizer gpt-neox``)."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), bos_token=EOS, eos_token=EOS,
                                  unk_token=EOS, pad_token=PAD)
    assert tok.convert_tokens_to_ids(EOS) == 0 and tok.convert_tokens_to_ids(PAD) == 1
    return tok


def wrap_tokenizer(backend: tokenizers.Tokenizer) -> PreTrainedTokenizerFast:
    """A ``tokenizers`` byte-level BPE as the transformers tokenizer saved with the model (eos 0, pad 1)."""
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                  clean_up_tokenization_spaces=False)
    assert tok.convert_tokens_to_ids(EOS) == 0 and tok.convert_tokens_to_ids(PAD) == 1
    return tok


def train_bpe_tokenizer(documents: list[str], vocab_size: int = BPE_SETTINGS["vocab_size"]) -> tokenizers.Tokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer regex, no normalizer) trained on ``documents``.

    The initial alphabet holds all 256 byte symbols, so any text encodes without an unknown token and decodes
    back byte for byte; ``<|endoftext|>`` and ``<|padding|>`` are ids 0 and 1, as in GPT-NeoX.
    """
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=BPE_SETTINGS["add_prefix_space"],
                                                     use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=BPE_SETTINGS["min_frequency"],
                                  special_tokens=BPE_SETTINGS["special_tokens"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(documents, trainer, length=len(documents))
    return backend


def corpus_files(corpus: Path) -> list[Path]:
    return sorted(f for f in corpus.rglob("*") if f.is_file() and f.name.startswith("wiki_"))


def _corpus_key(args) -> dict:
    files = corpus_files(args.corpus)
    if not files:
        raise SystemExit(f"no wiki_* files under {args.corpus}")
    return {"files": [(str(f.relative_to(args.corpus)), f.stat().st_size) for f in files],
            "max_bytes": args.max_corpus_bytes, "val_fraction": args.val_fraction}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


def split_documents(args) -> tuple[list[str], list[str]]:
    """(training articles, held-out articles): the held-out slice is the last ``--val-fraction`` of them."""
    documents = read_documents(args.corpus, args.max_corpus_bytes)
    if len(documents) < 2:
        raise SystemExit("the corpus slice holds fewer than 2 articles; raise --max-corpus-bytes")
    n_val = max(1, round(len(documents) * args.val_fraction))
    return documents[:-n_val], documents[-n_val:]


def get_tokenizer(args) -> tuple[PreTrainedTokenizerFast, dict]:
    """(tokenizer, its description for training_info.json) for ``--tokenizer``.

    ``bpe8k`` is trained on the training articles only (never the held-out ones, nor any evaluation text) and
    cached as ``tokenizer-bpe8k-<key>.json`` in ``--cache-dir``, the key a hash of the corpus files, the slice
    and ``BPE_SETTINGS``; with ``--tokens`` it comes from that file (the token cache stores its tokenizer).
    """
    if args.tokenizer == "gpt-neox":
        return load_tokenizer(args.tokenizer_file), {
            "name": "gpt-neox", "description": "GPT-NeoX-20B (shared/data/tokenizers/gpt-neox-20b/tokenizer.json)"}
    info = {"name": "bpe8k", "description": "byte-level BPE trained on the training articles with the tokenizers "
            "library (scripts/train_reference.py train_bpe_tokenizer)", "settings": BPE_SETTINGS}
    if args.tokens is not None:
        data = torch.load(args.tokens, weights_only=False)
        if data.get("tokenizer") != "bpe8k" or "tokenizer_json" not in data:
            raise SystemExit(f"--tokens {args.tokens} was not tokenized with bpe8k; pass --tokenizer "
                             f"{data.get('tokenizer', 'gpt-neox')} or retokenize")
        backend = tokenizers.Tokenizer.from_str(data["tokenizer_json"])
        return wrap_tokenizer(backend), {**info, "from_tokens_file": str(args.tokens)}
    key = _hash({**_corpus_key(args), "bpe": BPE_SETTINGS})
    cache = args.cache_dir / f"tokenizer-bpe8k-{key}.json"
    if cache.exists():
        print(f"bpe8k tokenizer from cache {cache}")
        meta_file = cache.with_suffix(".info.json")
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        return wrap_tokenizer(tokenizers.Tokenizer.from_file(str(cache))), {**info, **meta}
    t0 = time.perf_counter()
    train_docs, _ = split_documents(args)
    backend = train_bpe_tokenizer(train_docs)
    meta = {"trained_on_articles": len(train_docs), "vocab_size": backend.get_vocab_size(),
            "train_s": round(time.perf_counter() - t0, 1), "tokenizers_version": tokenizers.__version__}
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    backend.save(str(tmp))
    tmp.replace(cache)
    cache.with_suffix(".info.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"trained the bpe8k tokenizer ({meta['vocab_size']} tokens) on {len(train_docs):,} articles in "
          f"{meta['train_s']} s -> {cache}")
    return wrap_tokenizer(backend), {**info, **meta}


def read_documents(corpus: Path, max_bytes: int | None) -> list[str]:
    """Articles of the corpus in file order, ``<doc …>``/``</doc>`` lines dropped; at most ``max_bytes``."""
    documents, current, used = [], [], 0
    for path in corpus_files(corpus):
        with path.open(encoding="utf-8") as f:
            for line in f:
                if max_bytes is not None and used >= max_bytes:
                    break
                used += len(line.encode("utf-8"))
                if line.startswith("<doc "):
                    current = []
                elif line.startswith("</doc>"):
                    if current:
                        documents.append("".join(current).strip())
                    current = []
                else:
                    current.append(line)
        if max_bytes is not None and used >= max_bytes:
            break
    if current and "".join(current).strip():
        documents.append("".join(current).strip())
    return documents


def corpus_tokens(args, tokenizer) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train ids, held-out ids, info), cached in ``args.cache_dir``.

    The held-out slice is the last ``--val-fraction`` of the articles (whole articles, never trained on).
    Articles are joined with ``<|endoftext|>``. The cache records its tokenizer (``bpe8k``: the whole
    tokenizer JSON), so that ``--tokens`` trains with the tokenizer its ids came from.
    """
    if args.tokens is not None:
        data = torch.load(args.tokens, weights_only=False)
        if data.get("tokenizer", "gpt-neox") != args.tokenizer:
            raise SystemExit(f"--tokens {args.tokens} holds {data.get('tokenizer', 'gpt-neox')} ids, not "
                             f"{args.tokenizer}: pass --tokenizer {data.get('tokenizer', 'gpt-neox')}")
        print(f"tokenized corpus from {args.tokens}")
        return _ids(data["train"]), _ids(data["val"]), data["info"]
    if args.tokenizer == "gpt-neox":  # the key as before this option, so earlier caches still hit
        tokenizer_key = args.tokenizer_file.stat().st_size
    else:
        tokenizer_key = {"name": args.tokenizer,
                         "sha256": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()}
    fields = {**_corpus_key(args), "tokenizer": tokenizer_key, "version": 2}
    cache = args.cache_dir / f"tokens-{_hash(fields)}.pt"
    if cache.exists():
        data = torch.load(cache, weights_only=False)
        print(f"tokenized corpus from cache {cache}")
        return _ids(data["train"]), _ids(data["val"]), data["info"]
    t0 = time.perf_counter()
    train_docs, val_docs = split_documents(args)
    backend = tokenizer.backend_tokenizer
    eos = tokenizer.convert_tokens_to_ids(EOS)

    def encode(docs: list[str]) -> torch.Tensor:
        parts = []
        for i in tqdm(range(0, len(docs), 512), desc="tokenize", unit="512 docs", leave=False):
            for enc in backend.encode_batch(docs[i:i + 512], add_special_tokens=False):
                parts.append(np.asarray(enc.ids + [eos], dtype=np.uint16))  # vocabulary < 65536
        return np.concatenate(parts)

    train, val = encode(train_docs), encode(val_docs)
    n_docs = len(train_docs) + len(val_docs)
    info = {"articles": n_docs, "heldout_articles": len(val_docs), "train_tokens": len(train),
            "heldout_tokens": len(val), "max_corpus_bytes": args.max_corpus_bytes,
            "tokenize_s": round(time.perf_counter() - t0, 1)}
    data = {"train": train, "val": val, "info": info, "tokenizer": args.tokenizer}
    if args.tokenizer != "gpt-neox":
        data["tokenizer_json"] = backend.to_str()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)  # uint16: half the bytes to carry to a GPU
    print(f"tokenized {n_docs:,} articles in {info['tokenize_s']} s -> {cache}")
    return _ids(train), _ids(val), info


def _ids(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.int32))


# -- model ----------------------------------------------------------------------------------------------
def build_model(args) -> torch.nn.Module:
    common = dict(vocab_size=args.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  state_size=args.d_state, expand=2, tie_word_embeddings=True,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if args.family == "mamba":
        config = MambaConfig(**common, use_mambapy=args.scan == "mambapy")  # the training scan; off when saved
        return MambaForCausalLM(config)
    d_inner = 2 * args.hidden
    head_dim = 64
    while d_inner % head_dim:
        head_dim //= 2
    config = Mamba2Config(**common, head_dim=head_dim, num_heads=d_inner // head_dim, n_groups=1,
                          chunk_size=min(256, args.seq_len))
    return Mamba2ForCausalLM(config)


class WarmupCosine:
    """Linear warmup over the first ``WARMUP`` of training, then cosine decay to 10% of the peak lr."""

    def __init__(self, optimizer, lr: float, floor: float = 0.1):
        self.optimizer, self.lr, self.floor, self.progress = optimizer, lr, floor, 0.0

    def factor(self, progress: float) -> float:
        if progress < WARMUP:
            return progress / WARMUP
        x = min(1.0, (progress - WARMUP) / (1 - WARMUP))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * x))

    def step(self, progress: float) -> float:
        self.progress = progress
        lr = self.lr * self.factor(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"lr": self.lr, "floor": self.floor, "progress": self.progress}

    def load_state_dict(self, state: dict) -> None:
        self.progress = state["progress"]  # lr/floor come from this run's flags


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, window: int, batch_size: int, device, bf16: bool) -> float:
    """Mean next-token loss over non-overlapping windows of the held-out ids (each from an empty state)."""
    was_training = model.training
    model.eval()
    n = len(ids) // window
    total, count = 0.0, 0
    for x in ids[: n * window].view(n, window).long().split(batch_size):
        x = x.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    model.train(was_training)
    return total / count


# -- checkpoint -----------------------------------------------------------------------------------------
def rng_states(generator: torch.Generator) -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
              "data": generator.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    generator.set_state(states["data"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, model, optimizer, scheduler, generator, state: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "checkpoint.pt.tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng_states(generator), **state}, tmp)
    tmp.replace(path / "checkpoint.pt")


# -- main -----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", choices=["mamba", "mamba2"], default="mamba")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=None, help="where the tokenized corpus is cached "
                   "(default: the output directory)")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="where the resumable checkpoint goes "
                   "(default: <output-dir>/checkpoint)")
    p.add_argument("--data-dir", type=Path, default=SHARED_DATA, help="holds train-corpus/, "
                   "tokenizers/gpt-neox-20b/tokenizer.json and wikitext-2-raw/wiki.test.raw (default ../shared/data)")
    p.add_argument("--corpus", type=Path, default=None, help="default: <data-dir>/train-corpus")
    p.add_argument("--tokens", type=Path, default=None, help="a tokens-*.pt cache written by an earlier run: "
                   "train from it without the corpus (e.g. on a GPU machine the corpus is not copied to)")
    p.add_argument("--max-corpus-bytes", type=int, default=None, help="read only this many bytes of the corpus")
    p.add_argument("--val-fraction", type=float, default=0.01, help="last fraction of articles held out")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default=None,
                   help="gpt-neox: GPT-NeoX-20B's 50k vocabulary (gpu preset); bpe8k: an 8192-token byte-level BPE "
                        "trained on the training articles and cached in --cache-dir (cpu preset)")
    p.add_argument("--scan", choices=SCAN_CHOICES, default="auto",
                   help="Mamba-1 training scan: scripts/training_scan.py's sequential scan (2x faster than mambapy "
                        "per cpu-preset step on CPU) or mambapy's parallel scan; auto: sequential on CPU")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--d-state", type=int)
    p.add_argument("--steps", type=positive, help="total optimizer steps (upper bound with --minutes)")
    p.add_argument("--minutes", type=float, help="total wall-clock cap on the training loop (0: none)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (gpu preset)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--val-tokens", type=int, help="held-out tokens scored at each evaluation")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--wikitext-tokens", type=int, help="WikiText-2 test tokens scored at the end (0: skip)")
    p.add_argument("--wikitext-context", type=int)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint/")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.corpus = args.corpus or args.data_dir / "train-corpus"
    args.tokenizer_file = args.data_dir / TOKENIZER_FILE
    preset = PRESETS[args.preset]
    for name, value in preset.items():
        if name == "d_state":
            value = value[args.family]
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.cache_dir is None:
        args.cache_dir = args.output_dir
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.scan = resolve_scan(args.family, args.scan, device.type)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    tokenizer, tokenizer_info = get_tokenizer(args)
    # GPT-NeoX: 50280 as in the state-spaces configs; a trained BPE: its size rounded up to a multiple of 8
    args.vocab_size = VOCAB_SIZE if args.tokenizer == "gpt-neox" else -(-len(tokenizer) // 8) * 8
    train_ids, val_ids, corpus_info = corpus_tokens(args, tokenizer)
    if len(train_ids) <= args.seq_len:
        raise SystemExit(f"only {len(train_ids)} training tokens for seq len {args.seq_len}; raise --max-corpus-bytes")
    val_ids = val_ids[: args.val_tokens]
    val_window = min(args.seq_len, len(val_ids))

    model = build_model(args).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_embedding = model.get_input_embeddings().weight.numel()  # tied with the LM head
    params = list(model.named_parameters())
    decay = [p for n, p in params if p.ndim >= 2 and "A_log" not in n and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "A_log" not in n and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    scheduler = WarmupCosine(optimizer, args.lr)
    generator = torch.Generator().manual_seed(args.seed)

    ckpt_dir = args.checkpoint_dir or args.output_dir / "checkpoint"
    step, elapsed, losses, history, commands = 0, 0.0, [], [], []
    if args.resume:
        if not (ckpt_dir / "checkpoint.pt").exists():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_dir / 'checkpoint.pt'}")
        ckpt = torch.load(ckpt_dir / "checkpoint.pt", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_states(ckpt["rng"], generator)
        step, elapsed = ckpt["step"], ckpt["train_time_s"]
        losses, history, commands = ckpt["losses"], ckpt["history"], ckpt["commands"]
        print(f"resumed from step {step} ({elapsed:.0f} s trained)")
    commands.append(shlex.join(["python", *sys.argv]))
    print(f"{args.family}: {n_params:,} parameters ({n_embedding / n_params:.0%} in the {args.vocab_size} x "
          f"{args.hidden} embedding; tokenizer {args.tokenizer}), hidden {args.hidden} x {args.layers} layers, d_state "
          f"{args.d_state}; train tokens {len(train_ids):,}, held-out tokens {len(val_ids):,}; device {device}")

    budget_s = args.minutes * 60 if args.minutes else math.inf

    def progress(extra_step: int = 0) -> float:
        return max((step + extra_step) / args.steps, (elapsed + time.perf_counter() - t_loop) / budget_s)

    def state() -> dict:
        return {"step": step, "train_time_s": elapsed + time.perf_counter() - t_loop, "losses": losses,
                "history": history, "commands": commands, "args": {k: str(v) for k, v in vars(args).items()}}

    model.train()
    t_loop = time.perf_counter()
    bar = tqdm(total=args.steps, initial=step, desc=f"train {args.family}", unit="step", disable=args.no_progress)
    with training_scan(args.scan):
        while progress() < 1:
            lr = scheduler.step(progress(1))
            starts = torch.randint(len(train_ids) - args.seq_len, (args.batch_size,), generator=generator)
            x = torch.stack([train_ids[s: s + args.seq_len + 1] for s in starts]).long().to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(input_ids=x[:, :-1], use_cache=False).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            losses.append(round(loss.item(), 4))
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.1e}")
            if step % args.eval_every == 0 or progress() >= 1:
                recent = losses[-args.eval_every:]
                val = heldout_loss(model, val_ids, val_window, args.eval_batch_size, device, args.bf16)
                history.append({"step": step, "train_loss": round(sum(recent) / len(recent), 4),
                                "heldout_loss": round(val, 4), "heldout_ppl": round(math.exp(val), 2),
                                "time_s": round(state()["train_time_s"], 1)})
                bar.write(f"step {step}: train loss {history[-1]['train_loss']:.3f}, held-out loss {val:.3f} "
                          f"(ppl {math.exp(val):.1f})")
            if step % args.checkpoint_every == 0:
                save_checkpoint(ckpt_dir, model, optimizer, scheduler, generator, state())
    bar.close()
    final_state = state()
    save_checkpoint(ckpt_dir, model, optimizer, scheduler, generator, final_state)
    train_time = final_state["train_time_s"]

    out = args.output_dir
    model.config.use_mambapy = False  # saved with the sequential scan (the default inference path)
    save_kwargs = {}
    if args.bf16:
        model.to(torch.bfloat16)
        save_kwargs["max_shard_size"] = "15MB"  # each file <= 16 MiB, so they come back from a device call
    model.save_pretrained(out, **save_kwargs)
    for f in out.glob("model*.safetensors"):
        f.chmod(0o644)
    tokenizer.save_pretrained(out)
    del model, optimizer

    # Final numbers come from the saved files, loaded the way `gsq-hf eval` loads them.
    wikitext = None
    if args.wikitext_tokens:
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
        reloaded_tok = AutoTokenizer.from_pretrained(out)
        text = (args.data_dir / WIKITEXT_TEST).read_text(encoding="utf-8")
        windows = make_windows(reloaded_tok, text, args.wikitext_context, max_tokens=args.wikitext_tokens)
        result = full_sequence_perplexity(reloaded, windows, batch_size=args.eval_batch_size,
                                          progress=not args.no_progress)
        wikitext = {"file": "shared/data/wikitext-2-raw/wiki.test.raw", "max_tokens": args.wikitext_tokens,
                    "context": args.wikitext_context, "windows": windows.ids.shape[0],
                    "scored_tokens": result.tokens, "scored_words": result.words,
                    "method": "gsq_hf.eval.make_windows + full_sequence_perplexity (non-overlapping windows, each "
                              "from an empty state, first token context only), fp32, sequential scan",
                    "token_perplexity": round(result.perplexity, 2),
                    "word_perplexity": round(result.word_perplexity, 2),
                    # per byte of the scored text: compares models with different tokenizers
                    "scored_bytes": result.bytes, "bits_per_byte": round(result.bits_per_byte, 4),
                    "published_mamba_130m_wikitext2": PUBLISHED_MAMBA_130M_WIKITEXT2}

    recent = losses[-50:]
    info = {
        "model": "MambaForCausalLM" if args.family == "mamba" else "Mamba2ForCausalLM",
        "family": args.family, "preset": args.preset, "parameters": n_params, "vocab_size": args.vocab_size,
        "embedding_parameters": n_embedding, "embedding_share": round(n_embedding / n_params, 4),
        "hidden_size": args.hidden, "num_hidden_layers": args.layers, "state_size": args.d_state,
        "tokenizer": tokenizer_info,
        "steps": step, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "tokens_seen": step * args.batch_size * args.seq_len, "lr": args.lr, "weight_decay": args.weight_decay,
        "bf16_autocast": args.bf16, "saved_dtype": "bfloat16" if args.bf16 else "float32",
        "seed": args.seed, "device": str(device), "threads": torch.get_num_threads(),
        "train_time_s": round(train_time, 1), "wall_time_s_this_run": round(time.perf_counter() - t_start, 1),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last_50_steps": round(sum(recent) / len(recent), 4) if recent else None,
        "corpus": {"path": "shared/data/train-corpus (English Wikipedia, <doc> lines dropped)", **corpus_info,
                   "heldout_tokens_scored": len(val_ids)},
        "history": history, "train_losses": losses, "wikitext2_test": wikitext,
        "command": commands[-1], "commands": commands,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    summary = {k: info[k] for k in ("model", "parameters", "embedding_share", "steps", "tokens_seen", "train_time_s",
                                    "train_loss_first", "train_loss_last_50_steps")}
    print(json.dumps(summary, indent=2))
    if history:
        print(f"held-out loss {history[0]['heldout_loss']} (step {history[0]['step']}) -> "
              f"{history[-1]['heldout_loss']} (step {history[-1]['step']})")
    if wikitext:
        print(f"WikiText-2 raw test ({wikitext['scored_tokens']} tokens, context {wikitext['context']}): "
              f"token perplexity {wikitext['token_perplexity']}, word perplexity {wikitext['word_perplexity']}, "
              f"{wikitext['bits_per_byte']} bits/byte; "
              f"published mamba-130m WikiText-2: {PUBLISHED_MAMBA_130M_WIKITEXT2}")


if __name__ == "__main__":
    run_script(main)
