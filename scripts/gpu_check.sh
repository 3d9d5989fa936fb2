#!/usr/bin/env bash
# What only an accelerator can show, in one prepared run (issue 18): the CUDA tests, nmt_base
# steps in fp32/bf16/fp16 with their losses side by side, FSDP on one GPU, a bitwise resume with
# deterministic algorithms, and trainkit's step time against a raw loop. Writes its figures as a
# Markdown table to ${OUT}/gpu_check.md (a temporary folder without OUT) (and prints it).
#
#   bash scripts/gpu_check.sh            # on the GPU machine (about 5 minutes on one H200)
#   bash scripts/gpu_check.sh --cpu      # its CPU-only parts here, tiny sizes (about 2 minutes)
#
# The lent GPU machine has torch but not hydra-core, omegaconf or antlr4: carry their wheels in
# shared/wheels (pip download -d shared/wheels hydra-core==1.3.8 omegaconf==2.3.1
# antlr4-python3-runtime==4.9.3 sacrebleu sentencepiece) and this script installs them offline.
# The sync-free step: tests/test_cuda.py runs training steps under
# torch.cuda.set_sync_debug_mode("error") (any host sync in a step fails it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d)"
if [[ "${1:-}" == "--cpu" ]]; then DEVICE=cpu; STEPS=6; EXPERIMENT=nmt_tiny; else DEVICE=cuda; STEPS=200; EXPERIMENT=nmt_base; fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

if ! python -c "import hydra, omegaconf" 2>/dev/null; then
  pip install -q --no-index --find-links shared/wheels hydra-core omegaconf antlr4-python3-runtime || exit 3
fi
python -c "import trainkit" 2>/dev/null || pip install -q --no-deps --no-build-isolation -e . || exit 3

ROWS=()
row() { ROWS+=("| $1 | $2 | $3 |"); echo "[$1] $2 $3"; }
run() {  # run NAME OVERRIDES...: train into $WORK/NAME, print "<final val/loss> <steps/s>"
  local name=$1; shift
  local started=$(date +%s.%N)
  python -m trainkit train +experiment=$EXPERIMENT device=$DEVICE trainer.max_steps=$STEPS \
    logging.progress_bar=false logging.tensorboard=false trainer.test_after_fit=false \
    hydra.run.dir="$WORK/$name" "$@" > "$WORK/$name.log" 2>&1 || { echo "failed"; return 1; }
  python - "$WORK/$name/result.json" "$started" <<'EOF'
import json, sys, time
result = json.load(open(sys.argv[1]))
print(f"{result['final'].get('val/loss', float('nan')):.4f} {result['global_step'] / (time.time() - float(sys.argv[2])):.1f}")
EOF
}

# 1. The test suite's CUDA tests (skipped without CUDA).
if [[ $DEVICE == cuda ]]; then
  if python -m pytest -q -p no:cacheprovider -k "cuda" tests > "$WORK/pytest.log" 2>&1; then status=passed; else status=failed; fi
  row "CUDA-marked tests" "$status" "$(tail -1 "$WORK/pytest.log")"
  if python -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$WORK/sync.log" 2>&1; then status=passed; else status=failed; fi
  row "steps under set_sync_debug_mode(error) (tests/test_cuda.py)" "$status" "$(tail -1 "$WORK/sync.log")"
fi

# 2. Precisions: the same steps in fp32, bf16 and fp16; final validation losses side by side.
for precision in fp32 bf16 fp16; do
  if [[ $DEVICE == cpu && $precision == fp16 ]]; then continue; fi
  read -r loss rate < <(run "precision_$precision" precision=$precision) || true
  row "$EXPERIMENT precision=$precision, $STEPS steps" "val/loss ${loss:-failed}" "${rate:-?} steps/s (incl. start-up)"
done

# 3. FSDP on one device (a process group of one under torchrun).
if python -m torch.distributed.run --nproc-per-node=1 --standalone -m trainkit train +experiment=$EXPERIMENT \
     device=$DEVICE trainer.max_steps=$STEPS distributed.strategy=fsdp logging.progress_bar=false \
     trainer.test_after_fit=false hydra.run.dir="$WORK/fsdp" > "$WORK/fsdp.log" 2>&1; then
  row "fsdp, 1 process" "ok" "$(python -c "import json; print('val/loss', round(json.load(open('$WORK/fsdp/result.json'))['final']['val/loss'], 4))")"
else
  row "fsdp, 1 process" "failed" "see $WORK/fsdp.log"
fi

# 4. Resume, bitwise (deterministic cuBLAS workspace): stopped at step STEPS/2, resumed, compared.
export CUBLAS_WORKSPACE_CONFIG=:4096:8
half=$((STEPS / 2))
run whole > /dev/null || true
run stopped "+callbacks.stop={_target_: trainkit.callbacks.StopAt, step: $half}" > /dev/null || true
run resumed "resume=$WORK/stopped/checkpoints/last.pt" > /dev/null || true
same=$(python - "$WORK" <<'EOF' 2>/dev/null
import sys, torch
a = torch.load(f"{sys.argv[1]}/whole/checkpoints/last.pt", weights_only=True)["model"]
b = torch.load(f"{sys.argv[1]}/resumed/checkpoints/last.pt", weights_only=True)["model"]
print("bitwise" if all(torch.equal(a[k], b[k]) for k in a) else "differs")
EOF
)
row "resume at step $half of $STEPS (CUBLAS_WORKSPACE_CONFIG set)" "${same:-failed}" "whole vs stopped+resumed"

# 5. trainkit against a raw loop: step time ratio on the GPU (scripts/bench_gpu_step.py)
# (a 48M-parameter Transformer, windows of steps alternating, each ending in a device sync)
for precision in bf16 fp32; do
  if [[ $DEVICE == cpu && $precision == bf16 ]]; then continue; fi
  if [[ $DEVICE == cpu ]]; then flags="--cpu --windows 2 --steps 4"; else flags=""; fi
  if python scripts/bench_gpu_step.py $flags --precision $precision --json "$WORK/step_$precision.json" > "$WORK/step_$precision.log" 2>&1; then
    row "trainkit/raw step time, $precision" "$(python -c "import json; r = json.load(open('$WORK/step_$precision.json')); print(f\"{r['ratio']:.3f} ({r['trainkit_ms_per_step']} vs {r['raw_ms_per_step']} ms/step)\")")" "scripts/bench_gpu_step.py"
  else
    row "trainkit/raw step time, $precision" "failed" "see $WORK/step_$precision.log"
  fi
done

{
  echo "## GPU check ($(python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only")'), torch $(python -c 'import torch; print(torch.__version__)'))"
  echo
  echo "| check | result | detail |"
  echo "|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} > "$OUT_DIR/gpu_check.md"
cat "$OUT_DIR/gpu_check.md"
