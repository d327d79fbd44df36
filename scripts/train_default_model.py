"""Train the tiny built-in Mamba that ``gsq-hf eval`` uses when given no arguments.

The model and tokenizer learn from the ``train`` split of the standard library's
pydoc topics (see ``gsq_hf.eval.builtin``); the ``test`` split is held out.
Runs offline on CPU.  From the repository root, with the package importable
(``pip install -e .`` or ``PYTHONPATH=.``)::

    python scripts/train_default_model.py --minutes 14

Training stops when either ``--steps`` or ``--minutes`` runs out; the warmup +
cosine learning-rate schedule follows whichever is further along, so it always
ends decayed.  The run is deterministic for a given seed unless ``--minutes`` ends it first.
"""

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedTokenizerFast,
)

from gsq_hf.cli.common import positive, run_script
from gsq_hf.eval.builtin import BUILTIN_MODEL_DIR, builtin_text

EOS, PAD = "<|endoftext|>", "<|padding|>"
VOCAB_SIZE = 2048
HIDDEN_SIZE = 128
NUM_LAYERS = 4
WARMUP = 0.05  # fraction of training


def train_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``<|endoftext|>`` = 0 and ``<|padding|>`` = 1."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer)
    assert tok.token_to_id(EOS) == 0 and tok.token_to_id(PAD) == 1
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD)


@torch.no_grad()
def heldout_nll(model: MambaForCausalLM, ids: torch.Tensor, window: int, batch_size: int) -> tuple[float, int]:
    """Summed next-token NLL over consecutive non-overlapping windows of ``ids``.

    Each window is an independent ordinary forward from an empty state; its first
    token is context only.  Returns (total NLL in nats, number of predicted tokens).
    """
    was_training = model.training
    model.eval()
    n_full = len(ids) // window
    batches = list(ids[: n_full * window].view(n_full, window).split(batch_size))
    if len(ids) - n_full * window >= 2:
        batches.append(ids[n_full * window :][None])
    total, count = 0.0, 0
    for x in batches:
        logits = model(input_ids=x).logits[:, :-1].float()
        targets = x[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return total, count


def lr_factor(progress: float, warmup: float, floor: float = 0.1) -> float:
    """Linear warmup over the first ``warmup`` fraction, then cosine decay to ``floor``."""
    if progress < warmup:
        return progress / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", type=Path, default=BUILTIN_MODEL_DIR)
    p.add_argument("--steps", type=positive, default=700, help="optimizer steps (upper bound with --minutes)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock cap on the training loop")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--weight-decay", type=float, default=2.0, help="AdamW decay of the weight matrices")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    p.add_argument("--eval-window", type=int, default=512, help="tokens per held-out forward window")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    torch.manual_seed(args.seed)

    train_text, test_text = builtin_text("train"), builtin_text("test")
    tokenizer = train_tokenizer(train_text, VOCAB_SIZE)
    train_ids = torch.tensor(tokenizer(train_text)["input_ids"])
    test_ids = torch.tensor(tokenizer(test_text)["input_ids"])
    vocab_size = -(-len(tokenizer) // 8) * 8

    config = MambaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        state_size=16,
        expand=2,
        tie_word_embeddings=True,
        use_mambapy=True,  # parallel scan for training; switched off before saving
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = MambaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    params = list(model.named_parameters())
    decay = [p for n, p in params if p.ndim >= 2 and "A_log" not in n]
    no_decay = [p for n, p in params if p.ndim < 2 or "A_log" in n]  # A_log, D, biases, norms
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    print(
        f"params {n_params:,}  vocab {vocab_size}  train tokens {len(train_ids):,}  held-out tokens {len(test_ids):,}"
    )

    generator = torch.Generator().manual_seed(args.seed)
    budget_s = args.minutes * 60 if args.minutes else math.inf
    losses: list[float] = []
    history: list[dict[str, float]] = []
    step = 0
    model.train()
    t_train = time.perf_counter()
    bar = tqdm(total=args.steps, desc="train", unit="step")
    while max(step / args.steps, (time.perf_counter() - t_train) / budget_s) < 1:
        progress = max((step + 1) / args.steps, (time.perf_counter() - t_train) / budget_s)
        lr = args.lr * lr_factor(progress, WARMUP)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(len(train_ids) - args.seq_len + 1, (args.batch_size,), generator=generator)
        x = torch.stack([train_ids[s : s + args.seq_len] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.1e}")
        if step % args.eval_every == 0:
            nll, n = heldout_nll(model, test_ids, args.eval_window, args.batch_size)
            recent = losses[-args.eval_every :]
            history.append({"step": step, "train_loss": sum(recent) / len(recent), "heldout_ppl": math.exp(nll / n)})
            bar.write(f"step {step}: train loss {history[-1]['train_loss']:.3f}, held-out ppl {math.exp(nll / n):.1f}")
    bar.close()
    train_time = time.perf_counter() - t_train

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_mambapy = False  # the shipped config uses the plain sequential scan
    model.save_pretrained(out)
    (out / "model.safetensors").chmod(0o644)  # written 0600 (a temp file); installs must be able to read it
    tokenizer.save_pretrained(out)

    # Final numbers come from the saved files, loaded the way `gsq-hf eval` loads them.
    assert AutoTokenizer.from_pretrained(out)(test_text)["input_ids"] == test_ids.tolist()
    nll, n = heldout_nll(AutoModelForCausalLM.from_pretrained(out), test_ids, args.eval_window, args.batch_size)
    recent = losses[-50:]
    info = {
        "model": "MambaForCausalLM",
        "parameters": n_params,
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "steps": step,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_seen": step * args.batch_size * args.seq_len,
        "train_split_tokens": len(train_ids),
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "threads": args.threads,
        "train_time_s": round(train_time, 1),
        "wall_time_s": round(time.perf_counter() - t_start, 1),
        "train_loss_last_50_steps": sum(recent) / len(recent),
        "heldout": {
            "text": "gsq_hf.eval.builtin.builtin_text('test')",
            "tokens": len(test_ids),
            "predicted_tokens": n,
            "window_tokens": args.eval_window,
            "method": "non-overlapping windows, each an ordinary forward from an empty state; "
            "first token of each window is context only; sequential scan (use_mambapy=False)",
            "loss": nll / n,
            "perplexity": math.exp(nll / n),
        },
        "uniform_perplexity": vocab_size,
        "history": history,
        "command": shlex.join(["python", *sys.argv]),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    run_script(main)
