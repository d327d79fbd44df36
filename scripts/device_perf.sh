#!/bin/bash
# One call of the GPU machine (`run` tool) for the decode-speed measurements of issue #21: the fused state
# update per layer (CUDA-graph timings) and end-to-end greedy decoding, patched vs unpatched in one run, with
# the decode step captured in a CUDA graph (gsq_hf.generate_graph) and through plain model.generate. Every
# step has a hard `timeout`; everything is written straight into $OUT (JSON, logs, the markdown tables).
#
# Shapes: the mamba-2.8b and Mamba2-2.7B layers (bench_state_update.py); a Mamba2-2.7B-shaped stack of 8 layers
# and the mamba-130m shape (bench_generate.py); batch 1/64/256; configs fp32 bf16 int8 int4 gsq-gate gsq-4bit
# gsq-3bit (and, for the state update alone, int4 with stochastic rounding: eight elements per Philox call since
# 2026-12-06, four when docs/performance.md measured it 2x slower than int4). The state-update step also times
# the decode step's conv with the update for fp32, int8 and gsq-4bit
# (rows conv-torch+kernel-*, conv-kernel+kernel-*, and Mamba2's conv-fused-*: issue #21 item 2).
# Budget: about 9 minutes of steps (the tool's per-call limit is 600 s; device time is 15 min).
#
# Call: command "bash scripts/device_perf.sh", timeout_s 590 (carry [".whl"] if the machine lacks the pinned
#       transformers: wheels from `pip download --no-deps`, installed below).
# Back here: copy <files_at>/*.json into docs/perf/ and `python scripts/perf_report.py docs/perf/<file>.json`
#       into docs/performance.md.
#
# Dry run on a CPU (the plumbing, tiny shapes, no timings worth reading; tests/test_scripts.py runs it):
#   OUT=/tmp/out DRY_RUN=1 bash scripts/device_perf.sh
#
# Second mode, its own call (issue #22): `bash scripts/device_perf.sh speculative` times self-speculative decoding
# (bench_speculative.py: gsq-4bit + 4-bit conv window and int4 drafts, lookahead 8, replay rollback) against plain
# greedy `generate` with the fp32 and int8 states on the Mamba2-2.7B-shaped stack (random bf16 weights), batch 64
# then 1; about 6 minutes at most. Call: command "bash scripts/device_perf.sh speculative", timeout_s 590.
# Back here: copy <files_at>/speculative_b*.json into docs/perf/ and <files_at>/tables.md into docs/speculative.md.
# Dry run: OUT=/tmp/out DRY_RUN=1 bash scripts/device_perf.sh speculative
set -u
OUT=${OUT:?the device tool sets OUT}
MODE=${1:-perf}
case "$MODE" in perf|speculative) ;; *) echo "device_perf.sh: mode must be perf (default) or speculative, got '$MODE'"; exit 2;; esac
DRY_RUN=${DRY_RUN:-0}
export PYTHONUNBUFFERED=1
T0=$(date +%s); stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
mkdir -p "$OUT"
FAILED=0
step() {  # step NAME SECONDS COMMAND...: run under a hard timeout, log into $OUT/NAME.log, go on on failure
  local name=$1 limit=$2; shift 2
  stamp "$name (limit $limit s)"
  timeout -s INT -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  [ $rc -eq 0 ] || { echo "!!! $name exited $rc"; FAILED=1; }
}

if [ "$DRY_RUN" = 1 ]; then
  export TRITON_INTERPRET=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  fi
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

if [ "$MODE" = speculative ]; then
  for batch in 64 1; do
    if [ "$DRY_RUN" = 1 ]; then
      step "speculative_b$batch" 300 python3 scripts/bench_speculative.py --dry-run --batch-size $(( batch > 1 ? 4 : 1 )) \
        --json "$OUT/speculative_b$batch.json"
    else
      step "speculative_b$batch" $(( batch > 1 ? 300 : 200 )) python3 scripts/bench_speculative.py \
        --shape mamba2-2.7b-8l --batch-size $batch --new-tokens 64 --rounds 3 --json "$OUT/speculative_b$batch.json"
    fi
  done
  cat "$OUT"/speculative_b*.md > "$OUT/tables.md" 2> /dev/null
  ls -la "$OUT"; stamp "end (failed steps: $FAILED)"
  exit $FAILED
fi

CONFIGS="fp32 bf16 int8 int4 gsq-gate gsq-4bit gsq-3bit"
CONV="fp32 int8 gsq-4bit"
if [ "$DRY_RUN" = 1 ]; then
  step state_update 300 python3 scripts/bench_state_update.py --dry-run --batch-sizes 2 --variants $CONFIGS int4-sr \
    --conv $CONV
  step generate_graph 300 python3 scripts/bench_generate.py --dry-run --graph --configs $CONFIGS \
    --json "$OUT/bench_generate_graph.json"
  step generate 300 python3 scripts/bench_generate.py --dry-run --configs fp32 int8 --json "$OUT/bench_generate.json"
else
  step state_update 200 python3 scripts/bench_state_update.py --graph --no-torch-path --batch-sizes 1 64 256 \
    --variants $CONFIGS int4-sr --conv $CONV --tune fp32 int8 int4 --rep-ms 30 --json "$OUT/bench_state_update.json"
  step generate_graph 210 python3 scripts/bench_generate.py --graph --shapes mamba2-2.7b-8l mamba-130m \
    --batch-sizes 1 64 256 --configs $CONFIGS --new-tokens 96 --rounds 2 --json "$OUT/bench_generate_graph.json"
  step generate 120 python3 scripts/bench_generate.py --shapes mamba2-2.7b-8l --batch-sizes 1 256 \
    --configs fp32 int8 int4 --new-tokens 32 --rounds 1 --json "$OUT/bench_generate.json"
fi
for f in "$OUT"/*.json; do
  [ -e "$f" ] && python3 scripts/perf_report.py "$f" >> "$OUT/tables.md"
done
ls -la "$OUT"; stamp "end (failed steps: $FAILED)"
exit $FAILED
