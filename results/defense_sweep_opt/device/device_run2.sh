#!/bin/bash
# usage (device, repo root): bash .devdata_text/device_run2.sh LIMIT_S WORKERS [extra sweep args...]
set -u
LIMIT=$1; N=$2; shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 .devdata_text/upcast.py .devdata_text/minilm_fp16 /tmp/minilm || exit 1
python3 -c "import torch, transformers, rouge_score, textleak.metrics; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())" || exit 1
nvidia-cuda-mps-control -d && echo MPS on
W=/tmp/sweep; mkdir -p $W
NOTE="optimisation attacks run on an H100 with MiniLM weights rounded to fp16 then upcast to fp32 (the packaged folder exceeds the transfer limit); client on CPU"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 30 > $W/smi.log 2>&1 &
SMI=$!
PIDS=()
for k in $(seq 0 $((N-1))); do
  timeout $LIMIT python3 scripts/sweep_defenses.py --data-root .devdata_text --model /tmp/minilm \
    --families noise prune quantize dpsgd fedavg --sentences 20 \
    --device cuda --claim-dir $W/claims --order batch --out $W/w$k --merge results/defense_sweep_opt/results.jsonl --note "$NOTE" "$@" > $W/w$k.log 2>&1 &
  PIDS+=($!)
done
wait "${PIDS[@]}"
kill $SMI 2>/dev/null
cat $W/w*/results.jsonl > $W/all_rows.jsonl
echo "rows: $(wc -l < $W/all_rows.jsonl)"; grep -h "rouge1" $W/w*.log | wc -l; tail -n 3 $W/w0.log; tail -n 12 $W/smi.log
gzip -c $W/all_rows.jsonl > $OUT/all_rows.jsonl.gz; cp $W/w0.log $OUT/; ls -la $OUT
