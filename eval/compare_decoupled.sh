#!/usr/bin/env bash
# Coupled DMD2 vs Decoupled DMD on the embedded default, one-step and 4-step, at the main job's budget.
#
#   bash eval/compare_decoupled.sh                      # ~4 x 6 min of training + ~3 x 2 min of evaluation (idle 2 cores)
#   OUT=runs/compare_smoke NUM_PER_CLASS=2 bash eval/compare_decoupled.sh run.steps=6 run.ckpt_every=0 \
#       run.sample_every=0 method.regression_pairs=8 method.regression_steps=2     # smoke test (~1-2 min)
#
# Four students, each the main job (configs/distill_embedded.yaml: 1200 iterations, batch 16, TTUR 3, regression
# 0.5, lr 2e-4) with one change at a time:
#   coupled_1step     the main job itself                 decoupled_1step   -c distill_embedded_decoupled.yaml
#   coupled_4step     -c distill_embedded_decoupled_4step.yaml (a 4-step layer: student_steps 4, backsim)
#   decoupled_4step   both layers
# Extra arguments are overrides for every distill run. Then `dmd-dar eval` on one suite (the embedded suite's
# protocol, eval/suites/embedded.yaml, with these five models: the teacher's 50-step samples and the four
# students, same per-(class, seed) noise, NUM_PER_CLASS images per class, held-out data as the reference),
# three times with another baseline, so that every comparison is paired on the same noise:
#   $OUT/vs_teacher_50step    every student vs the teacher (HF gap, FD, CMMD, ST-LPIPS fidelity, CLIP top-1)
#   $OUT/vs_coupled_1step     decoupled_1step vs coupled_1step: the paired CIs of the one-step comparison
#   $OUT/vs_coupled_4step     decoupled_4step vs coupled_4step: the paired CIs of the 4-step comparison
# The samples are generated once ($OUT/eval/samples); each pass writes only its report, copied to its folder.
# Use a fresh OUT for a smoke test: a distill run resumes from the checkpoints in its folder.
set -euo pipefail
OUT=${OUT:-runs/compare_decoupled}
NUM_PER_CLASS=${NUM_PER_CLASS:-64}
DMD=${DMD:-dmd-dar}
PYTHON=${PYTHON:-python}
read -r -a EVAL_ARGS <<< "${EVAL_ARGS:-}"  # e.g. EVAL_ARGS="bootstrap=100 bootstrap_fd=20" for a smoke test

$DMD distill run.out_dir="$OUT/coupled_1step" "$@"
$DMD distill -c distill_embedded_decoupled.yaml run.out_dir="$OUT/decoupled_1step" "$@"
$DMD distill -c distill_embedded_decoupled_4step.yaml run.out_dir="$OUT/coupled_4step" "$@"
$DMD distill -c distill_embedded_decoupled.yaml -c distill_embedded_decoupled_4step.yaml \
    run.out_dir="$OUT/decoupled_4step" "$@"

mkdir -p "$OUT"
"$PYTHON" - "$OUT" "$NUM_PER_CLASS" <<'PY'
import sys
from pathlib import Path

from omegaconf import OmegaConf

out, n = Path(sys.argv[1]), int(sys.argv[2])
suite = OmegaConf.load(Path("eval/suites/embedded.yaml"))  # the embedded protocol: metrics, CLIP, reference
suite.name, suite.out_dir = "compare_decoupled", str(out / "eval")
suite.description = "coupled DMD2 vs Decoupled DMD, one-step and 4-step, same budget, paired noise"
teacher = next(m for m in suite.models if m.name == "teacher_50step")
students = ["coupled_1step", "decoupled_1step", "coupled_4step", "decoupled_4step"]
suite.models = [teacher] + [{"name": s, "checkpoint": str(out / s)} for s in students]
suite.num_per_class = suite.reference.num_per_class = n
OmegaConf.save(suite, out / "suite.yaml")
PY

for baseline in teacher_50step coupled_1step coupled_4step; do
  $DMD eval suite="$OUT/suite.yaml" baseline="$baseline" "${EVAL_ARGS[@]}"
  rm -rf "${OUT:?}/vs_$baseline" && mkdir -p "$OUT/vs_$baseline"
  find "$OUT/eval" -maxdepth 1 -type f -exec cp {} "$OUT/vs_$baseline/" \;
done
echo "reports: $OUT/vs_teacher_50step $OUT/vs_coupled_1step $OUT/vs_coupled_4step (report.html, metrics.json)"
