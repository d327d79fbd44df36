"""Train a tiny Mamba / Mamba2 on multi-query associative recall (MQAR): the models of ``gsq-hf recall``.

The model is a transformers ``MambaForCausalLM`` (``--family mamba``, trained with ``--scan``: the sequential
scan of ``scripts/training_scan.py`` on CPU, ``mambapy``'s parallel scan on a GPU; the saved config has
``use_mambapy=False``) or ``Mamba2ForCausalLM`` (``--family mamba2``, transformers'
chunked torch scan), built from a config and trained from scratch on freshly generated MQAR batches
(`gsq_hf.eval.recall.generate_mqar`; loss on the answer positions only). Every batch is new, so there is
no overfitting to watch: the held-out recall measures what the model learned of the task.

From the repository root, with the package importable (``pip install -e .``)::

    python scripts/train_recall.py --family mamba2 --device cpu --minutes 10 --output-dir runs/recall-mamba2

Training stops at whichever of ``--steps`` / ``--minutes`` comes first, at ``--stop-at`` held-out recall, or
on SIGTERM/SIGINT (``timeout 300 python ...`` is safe); the warmup + cosine schedule follows whichever budget
is further along, so it always ends decayed. Then the best model seen by the held-out monitor is saved with
``save_pretrained`` to ``--output-dir`` together with ``recall_model.json``: the MQARSpec (what ``gsq-hf
recall --model DIR`` rebuilds the task from), the exact command, steps, minutes, device, versions and the
final figure, the **decode-faithful fp32 recall** at the training gap (`recall_accuracy`, every token
stepped through the patched model) on ``--final-num`` sequences of seed 0 — the sequences ``gsq-hf recall``
scores by default. The model and a ``"status": "training"`` json are also written at every held-out
improvement, so a run killed hard still leaves its best model. The last line printed is a one-line summary
(``RESULT family=... recall_fp32=...``).

Held-out recall during training is the fast full-sequence argmax (the same scan as training) on
``--eval-num`` sequences of seed 1; training batches use seeds from 10**9 up, so they never meet the
evaluation sets. With ``--curriculum 2,4,8`` training starts at 2 pairs and moves to the next stage when the
held-out recall of the stage reaches ``--advance-at``; ``--gap-min`` draws each batch's gap in
[gap-min, gap] (the spec keeps ``gap`` as the training gap).

The committed models (``gsq_hf/assets/recall-*``; each ``recall_model.json`` holds its exact command):

* ``recall-mamba``: Mamba-1, 87k parameters (hidden 64, 2 layers, d_state 32), on CPU in 28 minutes, 1 thread
  (13,512 steps of batch 32, the other core busy), on 8 pairs / 64 keys and values / gap 32 with **2 queries**
  a sequence: decode-faithful fp32 recall 99.37% at gap 32, fast recall 98.0% at gap 128, 60.5% at 512::

      python scripts/train_recall.py --family mamba --device cpu --threads 1 --minutes 28 --steps 100000 \
          --batch 32 --hidden 64 --d-state 32 --lr 3e-3 --pairs 8 --keys 64 --values 64 --gap 32 --queries 2 \
          --eval-every 500 --output-dir runs/recall-mamba

* ``recall-mamba2``: Mamba2, 256k parameters (hidden 128, 2 layers, d_state 64), on an H200 in half a minute
  (batch 256, lr 3e-3; held-out recall 86% at step 400, 99% at 600), 8 queries a sequence: decode-faithful fp32
  recall 99.96% at gap 32, fast recall 99.7% at gap 512. On CPU (1 thread, 10 minutes, batch 64) the same
  model reached 26% (874 steps, still rising): its ``--device cuda`` command is in its json.

Why Mamba-1 needs fewer queries than pairs. With as many queries as pairs, each query's value is one of the
values not asked yet, and the last one is certain: a model that stores only *which values occurred* and
eliminates the answered ones scores mean(1/k, k = 1..pairs), 52% at 4 pairs and 34% at 8, without binding any
key to its value. Every earlier Mamba-1 run sat exactly there (hidden 64 or 128, d_state 16 or 32, 2 or 4
layers, lr 1e-3 or 3e-3, up to 18,000 steps, mambapy or the sequential scan, S4D-real or A = -1 init); on the
small task (4 pairs, 32 keys/values, gap 8), per query position: 28.5%, 41.6%, 51.2% and 100%, and 913 of
915 wrong answers another pair's value. Mamba2 leaves this plateau; Mamba-1, whose B and C are read from the
same convolved channels as the stored values (Mamba2 convolves B and C in channels of their own), does not
in the time available. With 2 queries of 4 pairs (elimination worth about 29%) the same model learned the
binding: 97% at 8,000 steps, 99.76% decode-faithful at 18,875 (14 minutes; fast recall 96.1% at 4x the
gap); with 2 of 8 pairs, the committed model above. 4 queries of 8 pairs: 19% after 6,000 steps (stopped).

Speed: Mamba-1 trains with ``scripts/training_scan.py`` on CPU (``--scan auto``): 44.4 ms a step (hidden 64,
d_state 32, batch 32, 24 tokens) against 186.6 ms with ``mambapy`` (``python scripts/training_scan.py``), so a
CPU run sees about 4x the examples.
MQAR is learned in a sudden drop after a plateau, after a number of examples (Zoology, Arora et al. 2023,
and Based train 2-layer models of width 64-256, lr 1e-4..3e-2, batch 256, tens of thousands of steps). On a
GPU shared by several runs ``--max-gpu-memory`` caps each process and a step that needs more runs in
micro-batches.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shlex
import signal
import sys
import time
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from gsq_hf.cli.common import positive, run_script
from gsq_hf.eval.recall import RECALL_INFO_FILE, MQARBatch, MQARSpec, generate_mqar, recall_accuracy

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts/training_scan.py
from training_scan import SCAN_CHOICES, resolve_scan, training_scan  # noqa: E402

TRAIN_SEED_BASE = 10**9  # training batch k of run seed s uses seed (s + 1) * 10**9 + k: never an evaluation seed
MONITOR_SEED = 1  # held-out set scored while training (fast full-sequence argmax)
FINAL_SEED = 0  # the final decode-faithful figure: the sequences `gsq-hf recall` scores by default
TRAINING_FLAGS = ("device", "threads", "scan", "seed", "batch", "init_std", "lr", "warmup", "weight_decay", "clip",
                  "advance_at", "hidden", "layers", "d_state", "expand", "conv_kernel", "head_dim", "groups",
                  "chunk_size")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--family", choices=("mamba", "mamba2"), default="mamba")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for training on CUDA (evaluation is fp32)")
    p.add_argument("--max-gpu-memory", type=float, default=12.0,
                   help="GiB of GPU memory this process may take (runs share one GPU: a step that needs more is "
                        "split into micro-batches, same gradient); 0: no cap")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--scan", choices=SCAN_CHOICES, default="auto",
                   help="Mamba-1 training scan: scripts/training_scan.py's sequential scan (several times faster on "
                        "CPU at these short lengths) or the mambapy parallel scan; auto: sequential on CPU")
    p.add_argument("--seed", type=int, default=0)
    budget = p.add_argument_group("budget")
    budget.add_argument("--steps", type=positive, default=20_000, help="optimizer steps (upper bound with --minutes)")
    budget.add_argument("--minutes", type=float, help="wall-clock cap on the training loop (evaluation is extra)")
    budget.add_argument("--stop-at", type=float, help="stop once the held-out recall (at the full task) reaches this")
    model = p.add_argument_group("model")
    model.add_argument("--hidden", type=int, default=128, help="hidden size (d_model)")
    model.add_argument("--layers", type=int, default=2)
    model.add_argument("--d-state", type=int, default=64, help="SSM state size N")
    model.add_argument("--expand", type=int, default=2, help="inner width = expand x hidden")
    model.add_argument("--conv-kernel", type=int, default=4)
    model.add_argument("--head-dim", type=int, default=32, help="Mamba2 head dimension")
    model.add_argument("--groups", type=int, default=1, help="Mamba2 B/C groups")
    model.add_argument("--chunk-size", type=int, default=32, help="Mamba2 scan chunk")
    model.add_argument("--init-std", type=float, default=0.02,
                       help="std of the embedding and linear weights at init (mamba_ssm's embedding init; "
                            "transformers' Mamba configs default to 0.1)")
    optim = p.add_argument_group("optimizer")
    optim.add_argument("--lr", type=float, default=3e-3)
    optim.add_argument("--warmup", type=float, default=0.05, help="fraction of the budget with a linear warmup")
    optim.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of weight matrices")
    optim.add_argument("--batch", type=int, default=64, help="sequences per step")
    optim.add_argument("--clip", type=float, default=1.0, help="gradient norm clip")
    task = p.add_argument_group("task (MQARSpec)")
    defaults = MQARSpec()
    for name in ("pairs", "gap", "queries", "keys", "values", "filler"):
        task.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    task.add_argument("--gap-min", type=int, help="draw each batch's gap uniformly in [gap-min, gap]")
    task.add_argument("--curriculum", help="pairs per stage, e.g. 2,4,8 (the last stage is --pairs)")
    task.add_argument("--advance-at", type=float, default=0.9, help="held-out recall that ends a curriculum stage")
    watch = p.add_argument_group("evaluation")
    watch.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    watch.add_argument("--eval-num", type=int, default=512, help="held-out sequences (fast full-sequence recall)")
    watch.add_argument("--final-num", type=int, default=1024, help="sequences of the final decode-faithful recall")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, spec: MQARSpec) -> torch.nn.Module:
    """A fresh model whose vocabulary holds the task (rounded up to a multiple of 8)."""
    common = dict(vocab_size=-(-spec.vocab_size // 8) * 8, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  state_size=args.d_state, expand=args.expand, conv_kernel=args.conv_kernel, pad_token_id=0,
                  bos_token_id=1, eos_token_id=1, tie_word_embeddings=True, initializer_range=args.init_std)
    if args.family == "mamba":
        return MambaForCausalLM(MambaConfig(**common, use_mambapy=args.scan == "mambapy"))
    inner = args.expand * args.hidden
    if inner % args.head_dim:
        raise SystemExit(f"--head-dim {args.head_dim} must divide expand x hidden = {inner}")
    return Mamba2ForCausalLM(Mamba2Config(**common, head_dim=args.head_dim, num_heads=inner // args.head_dim,
                                          n_groups=args.groups, chunk_size=args.chunk_size))


def stages(args: argparse.Namespace, spec: MQARSpec) -> list[MQARSpec]:
    """The curriculum: one spec per stage (fewer pairs, as many queries as fit), ending at ``spec``."""
    pairs = [int(p) for p in args.curriculum.split(",")] if args.curriculum else []
    if any(not 1 <= p <= spec.pairs for p in pairs) or pairs != sorted(pairs):
        raise SystemExit(f"--curriculum must be increasing pair counts in 1..{spec.pairs}, got {args.curriculum}")
    pairs = [p for p in pairs if p < spec.pairs] + [spec.pairs]
    return [replace(spec, pairs=p, queries=min(spec.queries, p)) for p in pairs]


def lr_factor(progress: float, warmup: float, floor: float = 0.05) -> float:
    """Linear warmup over the first ``warmup`` fraction, then cosine decay to ``floor``."""
    if progress < warmup:
        return max(progress / warmup, 1e-3)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def answer_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Cross-entropy on the answers only: the filler and the context pairs are unpredictable noise."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]  # (B, L-1, V)
    mask = mask[:, :-1]
    return F.cross_entropy(logits[mask].float(), ids[:, 1:][mask])


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: MQARBatch, args: argparse.Namespace,
               bf16: bool, splits: int) -> tuple[float, int]:
    """One optimizer step over ``batch`` in ``splits`` micro-batches (gradients accumulated).

    Out of GPU memory (several runs share one GPU), the step is retried with twice the micro-batches; returns
    the loss and the micro-batch count that worked, which the next steps keep.
    """
    rows = batch.input_ids.shape[0]
    ids, mask = batch.input_ids.to(args.device), batch.query_mask.to(args.device)
    while True:
        optimizer.zero_grad(set_to_none=True)
        try:
            total = 0.0
            for part_ids, part_mask in zip(ids.chunk(splits), mask.chunk(splits), strict=True):
                loss = answer_loss(model, part_ids, part_mask, bf16) * (part_ids.shape[0] / rows)
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            return total, splits
        except torch.OutOfMemoryError:
            if splits >= rows:
                raise
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            splits *= 2


def eval_rows(model: torch.nn.Module, length: int) -> int:
    """Rows per monitoring forward: the training scans hold a few (rows, inner, length, d_state) fp32 tensors."""
    config = model.config
    inner = config.expand * config.hidden_size
    return max(1, min(1024, 2**27 // (inner * length * config.state_size)))


@torch.no_grad()
def fast_recall(model: torch.nn.Module, batch: MQARBatch, device: str) -> float:
    """Held-out recall from one full-sequence forward (argmax at the query positions): a cheap monitor."""
    was_training = model.training
    model.eval()
    hits = total = 0
    rows = eval_rows(model, batch.input_ids.shape[1])
    start = 0
    while start < batch.input_ids.shape[0]:
        ids = batch.input_ids[start : start + rows].to(device)
        mask = batch.query_mask[start : start + rows, :-1].to(device)
        try:
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        except torch.OutOfMemoryError:
            if rows == 1:
                raise
            torch.cuda.empty_cache()
            rows //= 2
            continue
        hits += int(((logits.argmax(-1) == ids[:, 1:]) & mask).sum())
        total += int(mask.sum())
        start += ids.shape[0]
    model.train(was_training)
    return hits / total


class StopFlag:
    """SIGTERM/SIGINT end training at the next step (the model is still evaluated and saved); twice: at once.

    A context manager: the previous handlers come back on exit (the tests run `main` in-process).
    """

    def __enter__(self) -> StopFlag:
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def versions() -> dict[str, str]:
    import transformers

    import gsq_hf

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "transformers": transformers.__version__, "gsq_hf": gsq_hf.__version__}
    try:
        found["mambapy"] = metadata.version("mambapy")
    except metadata.PackageNotFoundError:
        pass
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found


def save(model: torch.nn.Module, out: Path, info: dict) -> None:
    """``save_pretrained`` with the sequential-scan config, plus ``recall_model.json``."""
    out.mkdir(parents=True, exist_ok=True)
    training_scan = getattr(model.config, "use_mambapy", None)
    if training_scan is not None:
        model.config.use_mambapy = False  # the mixers keep their own flag: training is unaffected
    model.save_pretrained(out)
    if training_scan is not None:
        model.config.use_mambapy = training_scan
    for file in out.iterdir():
        file.chmod(0o644)  # safetensors writes 0600 through a temp file
    write_info(out, info)


def write_info(out: Path, info: dict) -> None:
    (out / RECALL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def optimizer_for(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW; no decay on A_log, D, biases, norms and the (tied) embedding."""
    named = list(model.named_parameters())
    decayed = {n for n, p in named if p.ndim >= 2 and "A_log" not in n and "embed" not in n}
    return torch.optim.AdamW([{"params": [p for n, p in named if n in decayed], "weight_decay": args.weight_decay},
                              {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.98))


class Keeper:
    """The best model of the held-out monitor at the full task: kept in memory and checkpointed to disk."""

    def __init__(self, args: argparse.Namespace, info: dict) -> None:
        self.args, self.info = args, info
        self.recall, self.step, self.state = None, 0, None

    def offer(self, model: torch.nn.Module, recall: float, step: int) -> None:
        if self.recall is not None and recall < self.recall:  # a tie goes to the later, further-trained model
            return
        self.recall, self.step = recall, step
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        save(model, self.args.output_dir, {**self.info, "steps": step, "monitor": {**self.info["monitor"],
                                                                                   "best": recall, "best_step": step}})

    def restore(self, model: torch.nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def train(model: torch.nn.Module, args: argparse.Namespace, spec: MQARSpec, plan: list[MQARSpec], info: dict,
          bf16: bool) -> dict:
    """The training loop; ends with the best model of the held-out monitor at the full task loaded.

    Any failure inside the loop (out of memory even at one row per micro-batch, a kernel error) ends training
    instead of the run: the model kept so far is still saved and scored, and the json says why it stopped.
    """
    optimizer = optimizer_for(model, args)
    budget_s = args.minutes * 60 if args.minutes is not None else math.inf
    gap_min = info["training"]["gap_range"][0]
    gaps = random.Random(args.seed)
    stage, splits, step, stopped_by = 0, 1, 0, "steps"
    monitor = generate_mqar(plan[stage], args.eval_num, seed=MONITOR_SEED)
    history: list[dict] = []
    losses: list[float] = []
    keeper = Keeper(args, info)
    t_train = time.perf_counter()
    bar = tqdm(total=args.steps, desc=f"{args.family} train", unit="step", dynamic_ncols=True, mininterval=2)
    with StopFlag() as stop:
        try:
            while True:
                elapsed = time.perf_counter() - t_train
                if step >= args.steps or elapsed >= budget_s or stop.requested:
                    stopped_by = "steps" if step >= args.steps else "minutes" if elapsed >= budget_s else "signal"
                    break
                lr = args.lr * lr_factor(max(step / args.steps, elapsed / budget_s), args.warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                task = replace(plan[stage], gap=gaps.randint(gap_min, spec.gap))
                batch = generate_mqar(task, args.batch, seed=(args.seed + 1) * TRAIN_SEED_BASE + step)
                loss, splits = train_step(model, optimizer, batch, args, bf16, splits)
                step += 1
                losses.append(loss)
                bar.update()
                if step % args.eval_every:
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", refresh=False)
                    continue
                recall = fast_recall(model, monitor, args.device)
                recent = losses[-args.eval_every:]
                history.append({"step": step, "seconds": round(time.perf_counter() - t_train, 1),
                                "pairs": plan[stage].pairs, "loss": round(sum(recent) / len(recent), 4),
                                "recall": recall})
                bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", recall=f"{recall:.3f}", pairs=plan[stage].pairs,
                                lr=f"{lr:.1e}", refresh=False)
                if stage < len(plan) - 1:
                    if recall >= args.advance_at:
                        stage += 1
                        monitor = generate_mqar(plan[stage], args.eval_num, seed=MONITOR_SEED)
                        bar.write(f"step {step}: held-out recall {recall:.3f} at {plan[stage - 1].pairs} pairs; "
                                  f"now {plan[stage].pairs} pairs")
                    continue
                keeper.offer(model, recall, step)
                if args.stop_at is not None and recall >= args.stop_at:
                    stopped_by = "stop-at"
                    break
            if stage == len(plan) - 1:  # the last model competes too
                keeper.offer(model, fast_recall(model, monitor, args.device), step)
        except Exception as error:
            stopped_by = f"error: {type(error).__name__}: {' '.join(str(error).split())[:500]}"
            bar.write(f"training stopped at step {step}: {stopped_by}")
    bar.close()
    keeper.restore(model)  # the best held-out model, not the last one (none: the curriculum never finished)
    return {"steps": step, "minutes": round((time.perf_counter() - t_train) / 60, 2), "stopped_by": stopped_by,
            "kept_step": keeper.step if keeper.state is not None else step, "micro_batches": splits,
            "final_pairs": plan[stage].pairs, "monitor_best": keeper.recall, "history": history}


def final_figures(args: argparse.Namespace, spec: MQARSpec) -> dict:
    """The saved model, reloaded as `gsq-hf recall` loads it: decode-faithful fp32 recall at the training gap,
    and the fast full-sequence recall at 1x, 4x and 16x the gap (how far the model generalizes).

    If the decode-faithful run fails on the GPU, it is retried on the CPU (the model is tiny); the json names
    the device that produced the figure.
    """
    model = AutoModelForCausalLM.from_pretrained(args.output_dir).eval()
    final = generate_mqar(spec, args.final_num, seed=FINAL_SEED)
    figures: dict = {"recall_fp32": None, "final": {"seed": FINAL_SEED, "num": args.final_num, "gap": spec.gap}}
    errors = []
    for device in dict.fromkeys([args.device, "cpu"]):
        try:
            result = recall_accuracy(model.to(device), final, "fp32", batch_size=1024 if device != "cpu" else 256,
                                     progress=True)
        except Exception as error:  # leave a usable json all the same, with the reason
            errors.append(f"{device}: {type(error).__name__}: {' '.join(str(error).split())[:500]}")
            continue
        figures["recall_fp32"] = result["accuracy"]
        figures["final"].update(queries=result["queries"], correct=result["correct"], device=device,
                                seconds=round(result["seconds"], 1),
                                method="decode-faithful gsq_hf.eval.recall.recall_accuracy, fp32 state, the model "
                                       "reloaded from the saved files")
        break
    if errors:
        figures["final"]["errors"] = errors
    model.to(args.device)
    figures["fast_recall_by_gap"] = {}
    for gap in (spec.gap, 4 * spec.gap, 16 * spec.gap):
        try:
            figures["fast_recall_by_gap"][str(gap)] = fast_recall(
                model, generate_mqar(replace(spec, gap=gap), args.final_num, seed=FINAL_SEED), args.device)
        except Exception as error:
            figures["fast_recall_by_gap"][str(gap)] = None
            figures["final"].setdefault("errors", []).append(f"fast gap {gap}: {type(error).__name__}: {error}")
    return figures


def main(argv: list[str] | None = None) -> dict:
    import transformers

    args = parse_args(argv)
    args.scan = resolve_scan(args.family, args.scan, torch.device(args.device).type)
    t_start = time.perf_counter()
    transformers.logging.set_verbosity_error()  # the kernel-fallback notes are expected here
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device = torch.device(args.device)
        total = torch.cuda.get_device_properties(device).total_memory
        if args.max_gpu_memory > 0:
            index = device.index if device.index is not None else torch.cuda.current_device()  # torch 2.11 needs one
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_gpu_memory * 2**30 / total), index)
    try:
        spec = MQARSpec(**{name: getattr(args, name) for name in ("pairs", "gap", "queries", "keys", "values",
                                                                   "filler")})
    except ValueError as error:
        raise SystemExit(f"bad task: {error}") from None
    gap_min = args.gap_min or spec.gap
    if not 1 <= gap_min <= spec.gap:
        raise SystemExit(f"--gap-min must be in 1..--gap ({spec.gap}), got {gap_min}")
    plan = stages(args, spec)
    bf16 = args.bf16 and cuda
    model = build_model(args, spec).to(args.device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.family}: {n_params:,} parameters, vocab {model.config.vocab_size}, task {asdict(spec)}, "
          f"sequence {spec.length} tokens, device {args.device}{' bf16' if bf16 else ''}", flush=True)
    command = shlex.join(["python", *(sys.argv if argv is None else ["scripts/train_recall.py", *argv])])
    info = {"family": args.family, "model_class": type(model).__name__, "parameters": n_params,
            "spec": asdict(spec), "command": command, "status": "training", "versions": versions(),
            "training": {**{key: getattr(args, key) for key in TRAINING_FLAGS}, "bf16": bf16,
                         "max_gpu_memory": args.max_gpu_memory if cuda else None, "gap_range": [gap_min, spec.gap],
                         "curriculum": [s.pairs for s in plan], "train_seeds": f"(seed + 1) * {TRAIN_SEED_BASE} + step",
                         "loss": "cross-entropy on the answer positions only"},
            "monitor": {"seed": MONITOR_SEED, "num": args.eval_num, "gap": spec.gap,
                        "method": "full-sequence argmax with the training scan"}}
    with training_scan(args.scan):
        run = train(model, args, spec, plan, info, bf16)
    info["monitor"].update(best=run.pop("monitor_best"), history=run.pop("history"))
    info.update(status="done", **run)
    save(model, args.output_dir, info)
    info.update(final_figures(args, spec), wall_minutes=round((time.perf_counter() - t_start) / 60, 2))
    write_info(args.output_dir, info)
    figure = "FAILED" if info["recall_fp32"] is None else f"{info['recall_fp32']:.4f}"
    by_gap = " ".join(f"gap{g}={'-' if r is None else format(r, '.4f')}" for g, r in info["fast_recall_by_gap"].items())
    print(f"RESULT family={args.family} params={n_params} steps={info['steps']} minutes={info['minutes']} "
          f"device={args.device} recall_fp32={figure} fast[{by_gap}] out={args.output_dir}", flush=True)
    return info


if __name__ == "__main__":
    run_script(main)
