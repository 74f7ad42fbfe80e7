#!/usr/bin/env bash
# The GPU path, end to end on one GPU: `pcpp train` (Ray Train, NCCL, DeepSpeed with cluster/deepspeed/v100.json:
# fp16 with dynamic loss scaling, ZeRO-2) fine-tunes the CIFAR-10 ResNet-20 teacher with BNN++ weights (BW) for
# EPOCHS x STEPS_PER_EPOCH steps, then prints the throughput, the loss curve (one point per epoch) and the
# honest accuracy (the binarized network, pcpp.evaluation) from the run's epochs.jsonl.
#
#   bench/gpu_check.sh                      # 10 x 30 steps of batch 128 (300 steps)
#   EPOCHS=6 STEPS_PER_EPOCH=50 DATA=/path/to/cifar10 bench/gpu_check.sh
#
# DATA: a directory with train/ and test/ shard sets (pcpp prepare); default /work/data/cifar10 when it exists,
# else the offline sample in pipelines/demo_data, prepared into OUT. OUT: where the run goes (default a temp dir).
# Without a CUDA GPU that torch can use it says so and exits 0. DEVICE=cpu: the same run on CPU with the cpu
# preset (fp32), to check the script itself.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EPOCHS=${EPOCHS:-10}
STEPS_PER_EPOCH=${STEPS_PER_EPOCH:-30}
BATCH=${BATCH:-128}
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
USE_GPU=true PRESET=v100
if [[ "${DEVICE:-gpu}" == cpu ]]; then  # a dry run of this script on CPU: cluster/deepspeed/cpu.json instead
    USE_GPU=false PRESET=cpu
    gpu="CPU dry run (DEVICE=cpu): deepspeed preset cpu, no fp16"
elif ! gpu=$("$PY" - 2>&1 <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    cuda = torch.version.cuda or "none (a CPU build)"
    print(f"torch {torch.__version__}, CUDA {cuda}: no CUDA device visible", file=sys.stderr)
    sys.exit(1)
p = torch.cuda.get_device_properties(0)
arch = f"sm_{p.major}{p.minor}"
if arch not in torch.cuda.get_arch_list():
    print(f"{p.name} ({arch}) has no kernels in torch {torch.__version__} (built for "
          f"{' '.join(torch.cuda.get_arch_list())}): install the build ray_cluster.yaml installs", file=sys.stderr)
    sys.exit(1)
print(f"{p.name} ({arch}, {p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
); then
    echo "gpu_check: no usable GPU on this machine (${gpu##*$'\n'}); nothing to check, exit 0"
    exit 0
fi
echo "gpu_check: $gpu"
OUT=${OUT:-$(mktemp -d -t pcpp-gpu-check-XXXXXX)}
mkdir -p "$OUT"

if [[ -z "${DATA:-}" && -d /work/data/cifar10/train && -d /work/data/cifar10/test ]]; then
    DATA=/work/data/cifar10
fi
if [[ -z "${DATA:-}" ]]; then
    DATA="$OUT/data"
    for split in train test; do
        n=$([[ $split == train ]] && echo 4000 || echo 1000)
        [[ -d "$DATA/$split" ]] || .venv/bin/pcpp prepare "pipelines/demo_data/cifar10-$split-$n.tar.gz" "$DATA/$split" \
            --shard-size 1000 >/dev/null
    done
fi

cat > "$OUT/gpu_check.yaml" <<EOF
name: gpu-check
seed: 0
init: teacher
teacher: $PWD/pipelines/demo_data/resnet20-cifar10.th
model: {name: resnet20, num_classes: 10}
data: {train: $DATA/train, test: $DATA/test, batch_size: $BATCH, num_workers: 2,
       epoch_length: $((STEPS_PER_EPOCH * BATCH))}
binarize: {weight: bnn++, activation: null, scaling: layer, units: scaled}
algorithm: {rule: pc++}
optim: {name: adam, lr: 0.001, epochs: $EPOCHS, lr_schedule: cosine}
distill: {enabled: false}
distributed: {num_workers: 1, use_gpu: $USE_GPU, deepspeed: $PRESET}
tracking: {experiment: pcpp-gpu-check, run_root: $OUT/runs}
EOF
echo "gpu_check: $EPOCHS x $STEPS_PER_EPOCH steps of batch $BATCH, data $DATA, run under $OUT"
start=$(date +%s)
.venv/bin/pcpp train "$OUT/gpu_check.yaml" --run-dir "$OUT/run"
echo "gpu_check: wall time $(( $(date +%s) - start )) s (Ray start, DeepSpeed set-up and evaluation included)"

"$PY" - "$OUT/run" <<'EOF'
import json
import sys
from pathlib import Path

rows = [json.loads(line) for line in (Path(sys.argv[1]) / "epochs.jsonl").read_text().splitlines()]
print(f"{'epoch':>5} {'loss':>8} {'train fwd acc':>13} {'binary acc':>10} {'forward acc':>11} {'img/s':>8}")
for r in rows:
    print(f"{r['epoch']:>5} {r['loss']:>8.4f} {r['train_forward_acc']:>13.4f} {r['binary_acc']:>10.4f} "
          f"{r['forward_acc']:>11.4f} {r['images_per_s']:>8.0f}")
steady = rows[1:] or rows  # epoch 1 includes CUDA / NCCL warm-up
print(f"throughput: {sum(r['images_per_s'] for r in steady) / len(steady):.0f} images/s (training, epochs "
      f"{steady[0]['epoch']}..{steady[-1]['epoch']}); loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}")
print(f"honest (binarized) test accuracy: {rows[-1]['binary_acc']:.4f}; training forward: {rows[-1]['forward_acc']:.4f}")
EOF
