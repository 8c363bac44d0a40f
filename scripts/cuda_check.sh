#!/usr/bin/env bash
# The accelerator check (issue 14 §3), one prepared run of a few minutes where a GPU is lent:
#   1. the CUDA test subset (tests/test_cuda.py: CUDA = CPU in fp32, bf16 parameters, no host sync per step);
#   2. the step-time table on the device (`torchstep bench speed --device DEV`: torch AdamW for-loop / foreach /
#      fused vs every torchstep optimizer, and the Muon family vs torch.optim.Muon);
#   3. the compiled-step table (`--compiled`: every element-wise method eager vs compile=True (Triton) against
#      fused and compiled torch AdamW, with first-step compile seconds; COMPILED=0 leaves it out).
# Writes docs/speed-cuda.md (or $OUT/speed-cuda.md when OUT is set, as on the device machine).
# Usage: bash scripts/cuda_check.sh [DEVICE]   (DEVICE defaults to cuda; `cpu` proves the script works anywhere)
# Env: ROUNDS (3), STEPS (20), OPTIMIZERS (all; e.g. "adamw lion" for a quick proof run)
set -euo pipefail
cd "$(dirname "$0")/.."
DEV="${1:-cuda}"
PY="${PY:-.venv/bin/python}"
DEST="${OUT:-docs}/speed-cuda.md"
mkdir -p "$(dirname "$DEST")"
TMP="$(mktemp -d)"
echo "+ pytest -m cuda" >&2
set +e
"$PY" -m pytest -m cuda tests/test_cuda.py -p no:xdist -q -rs > "$TMP/tests.txt" 2>&1
RC=$?
set -e
echo "+ torchstep bench speed --device $DEV" >&2
"$PY" -m torchstep.cli bench speed --device "$DEV" --rounds "${ROUNDS:-3}" --steps "${STEPS:-20}" \
    ${OPTIMIZERS:+--optimizers $OPTIMIZERS} --out "$TMP/speed.md"
: > "$TMP/compiled.md"
if [ "${COMPILED:-1}" != 0 ]; then
  echo "+ torchstep bench speed --compiled --device $DEV" >&2
  "$PY" -m torchstep.cli bench speed --compiled --device "$DEV" --rounds "${ROUNDS:-3}" --steps "${STEPS:-20}" \
      ${OPTIMIZERS:+--optimizers $OPTIMIZERS} --out "$TMP/compiled.md"
fi
{
  echo "# Step time and CUDA checks on \`$DEV\`"
  echo
  echo "Produced by \`bash scripts/cuda_check.sh $DEV\` on $(date -u +%Y-%m-%d) ($("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'))."
  echo
  echo "## \`pytest -m cuda\` (exit code $RC)"
  echo
  echo '```'
  tail -n 30 "$TMP/tests.txt"
  echo '```'
  echo
  echo "## Step time"
  echo
  cat "$TMP/speed.md"
  if [ -s "$TMP/compiled.md" ]; then
    echo
    echo "## Compiled steps"
    echo
    cat "$TMP/compiled.md"
  fi
} > "$DEST"
echo "wrote $DEST" >&2
