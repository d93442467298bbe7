#!/usr/bin/env bash
# Train the embedded teacher on the lent GPU machine with the committed config (same command as on CPU); extra
# arguments are config overrides, e.g. for the order-of-magnitude longer run the lattice classes need (the config
# already has the convolutional MLP, bf16 and the cosine decay, whose end follows run.steps):
#   bash eval/gpu_train_teacher.sh run.steps=60000
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
start=$(date +%s)
python3 -m dmd_dar.cli train-teacher -c teacher_embedded.yaml run.out_dir=/tmp/teacher run.progress=false run.num_workers=6 "$@" \
  > "$OUT/train.log" 2>&1 || { tail -40 "$OUT/train.log"; exit 1; }
echo "train wall seconds: $(( $(date +%s) - start ))"
tail -3 "$OUT/train.log"
mkdir -p "$OUT/export"
cp /tmp/teacher/export/model.safetensors /tmp/teacher/export/dmd_dar.json /tmp/teacher/export/samples_grid.png "$OUT/export/"
cp /tmp/teacher/config.yaml "$OUT/"
cp /tmp/teacher/logs/*/events.out.tfevents.* "$OUT/events.tfevents"
grep -c . /tmp/teacher/config.yaml
