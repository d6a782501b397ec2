#!/bin/bash
# usage (device, repo root): bash .devdata_text/device_eval.sh LIMIT_S PRIOR_JSONL_OR_- [textleak evaluate args...]
set -u
LIMIT=$1; PRIOR=$2; shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:.:.devdata_text/shim PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 .devdata_text/upcast.py .devdata_text/minilm_fp16 /tmp/minilm || exit 1
nproc; python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
mkdir -p /tmp/ev
[ "$PRIOR" != "-" ] && cp "$PRIOR" /tmp/ev/eval.jsonl
start=$(date +%s)
timeout $LIMIT python3 -m textleak evaluate --data-root .devdata_text --out /tmp/ev/eval --no-progress "$@" > /tmp/ev/log 2>&1
echo "rc $? after $(( $(date +%s) - start )) s"; tail -n 30 /tmp/ev/log
cp /tmp/ev/eval.* $OUT/ 2>/dev/null; cp /tmp/ev/log $OUT/eval.log; ls -la $OUT
