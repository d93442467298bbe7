#!/usr/bin/env bash
# Train the embedded teacher on a lent GPU machine inside one device session (at most 10 minutes a command, 15 a
# session): eval/train_teacher_in_budget.py times a short calibration run, then trains once for as many steps as
# fit TRAIN_SECONDS (default 420) with the committed config's cosine decay ending at the last step, and leaves the
# export, the resolved config, the log and a summary in $OUT. Extra arguments are config overrides for both runs:
#   bash eval/gpu_train_teacher.sh                                          # the committed config (batch 64)
#   bash eval/gpu_train_teacher.sh run.batch_size=256 optim.lr=2e-3         # 4x the images a step
#   bash eval/gpu_train_teacher.sh init_from=assets/teacher run.batch_size=256 optim.lr=1e-3 \
#        diffusion.logit_mean=1.0986   # continue the committed teacher (its 9000 CPU steps), timesteps towards noise
# Then, on the CPU machine: dmd-dar eval suite=<a copy of eval/suites/teacher.yaml pointing at the export>.
set -euo pipefail
: "${OUT:?set OUT to the folder the results go to (the device tool sets it)}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 eval/train_teacher_in_budget.py --seconds "${TRAIN_SECONDS:-420}" --out "$OUT" -- run.num_workers=6 "$@"
tail -3 "$OUT/train.log"
