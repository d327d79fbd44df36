#!/bin/bash
# One call of the GPU machine (`device` tool): the GPU reference language models (Mamba and Mamba2,
# `train_reference.py --preset gpu`), trained at once on one GPU. (The recall models train on CPU: see
# scripts/train_recall.py.) Everything it returns is under $OUT, within the tool's limits (<= 8 files of <= 16 MiB,
# <= 64 MiB): run.log and models.tar.gz.part-* (the saved model directories, no optimizer state).
#
# Prepare on this machine (both paths are git-ignored, so the call must carry them):
#   .whl/      wheels the machine lacks: transformers matching pyproject's pin, mambapy (pip download --no-deps)
#   gpu_data/  tokens.pt (the tokenized corpus: copy the tokens-*.pt that any train_reference.py run caches),
#              tokenizers/gpt-neox-20b/tokenizer.json and wikitext-2-raw/wiki.test.raw (from ../shared/data)
# Call: command "bash scripts/device_run.sh", carry [".whl", "gpu_data"], timeout_s 560 (the jobs stop by
# themselves after about 6.5 minutes; each has a hard timeout).
# Back here:  mkdir -p runs && cat <files_at>/models.tar.gz.part-* | tar -C runs -xzf -
#
# Dry run on a CPU (checks the plumbing and the packing, not the models):
#   OUT=/tmp/out DEVICE=cpu REF_MINUTES=0.2 WIKITEXT_TOKENS=2048 \
#     REF_ARGS="--batch-size 2 --seq-len 128 --val-tokens 1024 --eval-every 5" bash scripts/device_run.sh
set -u
OUT=${OUT:?the device tool sets OUT}
DEVICE=${DEVICE:-cuda}
REF_MINUTES=${REF_MINUTES:-4.5}
WIKITEXT_TOKENS=${WIKITEXT_TOKENS:-65536}
REF_ARGS=${REF_ARGS:-}        # appended to each command line (a later flag wins): for the dry run
RUNS=/tmp/gsq-runs
export PYTHONUNBUFFERED=1
T0=$(date +%s); stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
rm -rf "$RUNS"; mkdir -p "$OUT" "$RUNS"
exec > >(tee -a "$OUT/run.log") 2>&1

if [ "$DEVICE" != cpu ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

stamp "training (both reference LMs, in parallel)"
PIDS=()  # waited for by pid: a bare `wait` would also wait for the tee above, which never ends
LIMIT=$(python3 -c "print(int($REF_MINUTES * 60 + 150))")  # training + final evaluation
for family in mamba mamba2; do
  timeout -s INT "$LIMIT" python3 scripts/train_reference.py --family "$family" --preset gpu --device "$DEVICE" \
    --minutes "$REF_MINUTES" --wikitext-tokens "$WIKITEXT_TOKENS" --data-dir gpu_data --tokens gpu_data/tokens.pt \
    --output-dir "$RUNS/ref-$family-gpu" --checkpoint-dir "/tmp/ckpt-$family" --no-progress $REF_ARGS \
    > "$RUNS/ref-$family-gpu.log" 2>&1 &
  PIDS+=($!)
done
wait "${PIDS[@]}"
stamp "training done"
for f in "$RUNS"/*.log; do echo "--- $f"; grep -v -e "^\s*$" -e "^\[transformers\]" "$f" | tr '\r' '\n' | grep -v "step/s" | tail -8; done

rm -rf "$RUNS"/ref-*/checkpoint
tar -C "$RUNS" -czf - . | split -b 15m - "$OUT/models.tar.gz.part-"
ls -la "$OUT"; du -sh "$OUT"; stamp "end"
exec 1>&- 2>&-; wait  # close the log's pipe and let tee finish writing run.log before the call returns
