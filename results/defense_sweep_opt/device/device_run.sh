#!/bin/bash
# Ran on the H100 from the repo root, with .devdata_text/ (cola/{dev,train}.tsv and minilm_fp16/: the packaged
# MiniLM config/tokenizer files plus model_fp16.safetensors) and .whl/ (rouge_score, nltk, defusedxml wheels) carried.
# usage (device, repo root): bash results/defense_sweep_opt/device/device_run.sh LIMIT_S WORKERS [extra sweep args...]
set -u
LIMIT=$1; N=$2; shift 2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 results/defense_sweep_opt/device/upcast.py .devdata_text/minilm_fp16 /tmp/minilm || exit 1
python3 -c "import torch, rouge_score, textleak.metrics; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
[ -n "${SKIP_CHECK:-}" ] || python3 results/defense_sweep_opt/device/check.py /tmp/minilm || exit 1
W=/tmp/sweep; mkdir -p $W
PRIOR=(); [ -f results/defense_sweep_opt/device_rows.jsonl ] && PRIOR=(--merge results/defense_sweep_opt/device_rows.jsonl)
NOTE="optimisation attacks run on an H100 with MiniLM weights rounded to fp16 then upcast to fp32 (the packaged folder exceeds the transfer limit); client on CPU"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 20 > $W/smi.log 2>&1 &
SMI=$!
PIDS=()
for k in $(seq 0 $((N-1))); do
  timeout $LIMIT python3 scripts/sweep_defenses.py --data-root .devdata_text --model /tmp/minilm \
    --families noise prune quantize dpsgd fedavg --batch-sizes 1 4 --sentences 20 --attacks dlg tag cosine \
    --device cuda --claim-dir $W/claims --order batch --out $W/w$k "${PRIOR[@]}" --note "$NOTE" "$@" > $W/w$k.log 2>&1 &
  PIDS+=($!)
done
wait "${PIDS[@]}"
kill $SMI 2>/dev/null
cat $W/w*/results.jsonl > $W/all_rows.jsonl
echo "rows: $(wc -l < $W/all_rows.jsonl)"; tail -n 3 $W/w0.log; cat $W/smi.log | tail -n 12
tar czf $OUT/sweep.tgz -C $W . && ls -la $OUT
# (the runs themselves called it as .devdata_text/device_run.sh, with check.py/upcast.py beside it; same contents)
