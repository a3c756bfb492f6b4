#!/usr/bin/env bash
# The prepared device check for a GPU machine (one call, ~6-7 minutes on an H100/H200; 262 s on an
# H200 before the 128-face, baseline and compile runs were added):
#   1. bf16 smoke runs of the real CLIs: shard synthetic faces, train a tiny recognizer, pretrain
#      FaceMAE with IRM through it under DeepSpeed ZeRO-2, reconstruct the unseen split;
#   2. throughput: ViT-B/8 and ViT-B/16 at 112 px, bf16, ZeRO-2, 512 faces per GPU (and 128),
#      img/s per GPU, MFU and the same model in plain PyTorch; then both with IRM through a
#      MobileFaceNet (the configs' teacher) and an iResNet-50 teacher: their img/s against the
#      first run's is IRM's overhead on that GPU (bench/bench_zero.py).
# The GPU image has torch/timm/accelerate/rich but not deepspeed/webdataset/submitit: `make gpu-wheels`
# here puts them into .whl/, which this script installs when it finds it (carry `.whl` to the device).
# Results go to $OUT (default runs/gpu-check): throughput.json, smoke.log, gpu.txt, metrics.jsonl and
# a pretraining grid (few files: the device tool brings back at most 8).
# ZERO_SWEEP=1 adds ViT-B/16 under other DeepSpeed settings (overlap_comm off, ZeRO-1, ZeRO-0)
# and a profile of the default (~2 min more). IRM_VARIANTS=1 adds MobileFaceNet-IRM with the
# teacher's weights in bf16 and with the teacher compiled. To fit a short device budget:
# MB128=0 skips the 128-face runs, TEACHERS="mobilefacenet" skips the iResNet-50 teacher.
# Also runs on a CPU machine (fp32, micro-batches of 4) to check the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
# the wheels are for the GPU image's Python 3.12, and only needed where the packages are missing
if compgen -G ".whl/*.whl" >/dev/null && ! python3 -c 'import deepspeed, webdataset, submitit' 2>/dev/null \
  && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/facemae-site .whl/*.whl
  export PYTHONPATH=/tmp/facemae-site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  export DS_ACCELERATOR=cuda PREC=bf16 MICRO=512  # the realistic configs' faces per GPU
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  fi
else
  export DS_ACCELERATOR=cpu PREC=fp32 MICRO=4
fi
python3 -c 'import torch, timm, deepspeed, webdataset as wds
print("torch", torch.__version__, "timm", timm.__version__, "deepspeed", deepspeed.__version__)' \
  | tee -a "$OUT/gpu.txt"
W=/tmp/facemae-gpu-check
rm -rf "$W" && mkdir -p "$W"
STEP_TIMEOUT=${STEP_TIMEOUT:-200}  # a hung step must not eat the device time of the others
facemae() { python3 -m facemae_dist "$@"; }

# A failing smoke step is recorded and the script goes on: the throughput runs must not be lost to it.
failed=()
smoke() {  # smoke NAME SUBCOMMAND ARGS...: run one `facemae` step, its log appended to smoke.log
  local name=$1
  shift
  echo "== $name: facemae $*" >>"$OUT/smoke.log"
  if ! timeout "$STEP_TIMEOUT" python3 -m facemae_dist "$@" >"$W/$name.log" 2>&1; then
    failed+=("$name")
    echo "SMOKE FAILED: $name (tail of its log follows; all of it in $OUT/smoke.log)"
  fi
  cat "$W/$name.log" >>"$OUT/smoke.log"
  tail -n 3 "$W/$name.log"
}

echo "== 1. smoke: shard -> train (teacher) -> pretrain (IRM, ZeRO-2, $PREC) -> reconstruct"
facemae shard 48x12 "$W/shards" --shuffle --holdout-identities 8 --no-progress
smoke train train --config configs/recog/tiny_cpu.yaml data.train="$W/shards/train" \
  run.out_dir="$W/teacher" run.max_steps=30 engine.precision="$PREC"
smoke pretrain pretrain --config configs/mae/tiny_cpu.yaml data.train="$W/shards/train" \
  run.out_dir="$W/mae" run.max_steps=30 engine.precision="$PREC" irm.weight=1.0 \
  irm.teacher="$W/teacher/backbone.safetensors" irm.teacher_arch=tiny irm.teacher_embedding=128
smoke reconstruct reconstruct --model "$W/mae" "$W/shards/unseen" "$W/release"
cp "$W"/mae/images/*.png "$W"/mae/metrics.jsonl "$OUT/" 2>/dev/null || true

echo "== 2. throughput: bench/bench_zero.py (same-run plain-PyTorch baseline)"
bench() {  # bench NAME ARGS...: one bench_zero run, its results in $W/NAME.json
  local name=$1
  shift
  timeout "$STEP_TIMEOUT" python3 bench/bench_zero.py --precision "$PREC" --json "$W/$name.json" \
    ${QUICK:+--quick} "$@" || failed+=("bench_zero $*")
}
if [ -n "${NO_BASELINE:-}" ]; then bench zero --micro-batch "$MICRO"; else bench zero --micro-batch "$MICRO" --baseline; fi
if [ "$PREC" = bf16 ] && [ -z "${QUICK:-}" ] && [ "${MB128:-1}" = 1 ]; then  # host-bound at 128
  bench zero_mb128 --micro-batch 128 --baseline
  # compilation against the host-bound case (B/16 at 128 faces): a lead for the trainers
  bench zero_mb128_compiled --micro-batch 128 --compile --model facemae_vit_base_patch16_112
fi
for teacher in ${TEACHERS:-mobilefacenet iresnet50}; do  # the configs' teacher, a heavier one
  bench "zero_irm_$teacher" --micro-batch "$MICRO" --irm "$teacher"
done
if [ -n "${IRM_VARIANTS:-}" ]; then  # the teacher eager (the trainers before) and in bf16 weights
  bench zero_irm_mbf_eager --micro-batch "$MICRO" --irm mobilefacenet --irm-compile false
  if [ "$PREC" = bf16 ]; then
    bench zero_irm_mbf_bf16w --micro-batch "$MICRO" --irm mobilefacenet --irm-weights bf16
  fi
fi
if [ -n "${ZERO_SWEEP:-}" ]; then  # where ZeRO-2's fixed per-step cost comes from
  # On the H200 DeepSpeed ran ViT-B/16 at 0.52x plain PyTorch (512 faces), a fixed ~35 ms per step;
  # on the CPU its host-side hooks cost ~4 ms. Suspects: overlap_comm's full device synchronize
  # before every gradient bucket and after backward (stage_1_and_2.py), then the stage itself.
  python3 -c 'import json, sys; c = json.load(open("configs/deepspeed/zero2.json"))
c["zero_optimization"]["overlap_comm"] = False; json.dump(c, open(sys.argv[1], "w"))' "$W/no_overlap.json"
  B16=(--micro-batch "$MICRO" --model facemae_vit_base_patch16_112)
  # the default again, in the same stretch, with a profile: synchronize calls show in its CPU table
  bench zero_sweep_default "${B16[@]}" --profile "$OUT"
  bench zero_sweep_no_overlap "${B16[@]}" --deepspeed-config "$W/no_overlap.json"
  bench zero_sweep_stage1 "${B16[@]}" --zero 1
  bench zero_sweep_stage0 "${B16[@]}" --zero 0
fi
# one file for all (the device tool brings back at most 8 files)
python3 - "$W"/zero*.json >"$OUT/throughput.json" <<'EOF' || true
import json, sys
rows = []
for name in sys.argv[1:]:
    try:
        rows += json.load(open(name))
    except (OSError, ValueError):  # a bench killed while writing: keep the others
        print(f"skipped unreadable {name}", file=sys.stderr)
print(json.dumps(rows, indent=1))
EOF
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED steps: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all steps passed"
