"""Train the embedded teacher for as many steps as fit a wall-clock budget (made for lent GPU sessions).

A lent device gives one command at most 10 minutes and a session 15 minutes in all, and the teacher config's cosine
decay must end at the run's last step, so a long run cannot simply be cut off when time is up. This script:

1. runs a short calibration (``--calibration-steps`` of the same config and overrides, logging every 10 steps) and
   fits the time per step from when the step counts reach ``metrics.jsonl``, after the first third (warm-up);
   everything else the command spends (start-up, export, the final sample grid) is its fixed cost;
2. sets ``run.steps`` to the largest multiple of 100 that fits ``--seconds`` with that fixed cost (and a
   ``--margin`` for checkpoints), and runs ``dmd-dar train-teacher`` once with it (no grids on the way: on a CPU
   they cost more than the steps around them; the export's grid is part of the fixed cost);
3. copies the export (weights, metadata, sample grid), the resolved config and a summary into ``--out``.

    python eval/train_teacher_in_budget.py --seconds 420 --out "$OUT" -- run.batch_size=256 optim.lr=2e-3
    python eval/train_teacher_in_budget.py --seconds 120 --calibration-steps 40 --out /tmp/t -- optim.warmup_steps=20

Arguments after ``--`` are config overrides for both runs. Judge the result with ``dmd-dar eval
suite=eval/suites/teacher.yaml`` (point its checkpoint at the copied export).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "dmd_dar.cli", "train-teacher", "-c", "teacher_embedded.yaml", "run.progress=false",
           "run.log_with=none", "run.resume=false"]


def seconds_per_step(arrivals: list[tuple[int, float]]) -> float:
    """Least-squares slope of (step, time) over the arrivals after the first third of the steps."""
    last = arrivals[-1][0]
    points = [(s, t) for s, t in arrivals if s > last / 3] or arrivals
    if len(points) < 2:
        raise ValueError(f"need at least two logged steps to time a step, got {arrivals}")
    n = len(points)
    ms, mt = sum(s for s, _ in points) / n, sum(t for _, t in points) / n
    var = sum((s - ms) ** 2 for s, _ in points)
    return sum((s - ms) * (t - mt) for s, t in points) / var


def steps_that_fit(seconds: float, fixed: float, per_step: float, margin: float, warmup: int, multiple: int = 100
                   ) -> int:
    """The largest multiple of ``multiple`` whose run (fixed cost + steps x per_step) fits ``seconds - margin``."""
    steps = int((seconds - margin - fixed) / per_step) // multiple * multiple
    if steps <= warmup:
        raise SystemExit(f"a budget of {seconds:.0f} s fits only {max(steps, 0)} steps (fixed cost {fixed:.0f} s, "
                         f"{1e3 * per_step:.1f} ms a step), not more than the {warmup} warm-up steps: give more "
                         f"--seconds, or lower optim.warmup_steps")
    return steps


def run_and_watch(cmd: list[str], metrics: Path, log: Path) -> tuple[float, list[tuple[int, float]]]:
    """Run ``cmd`` (output to ``log``), noting when each logged step reaches ``metrics``; (wall seconds, arrivals)."""
    arrivals: list[tuple[int, float]] = []
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def watch() -> None:
            seen = 0
            while not done.is_set():
                if metrics.is_file():
                    text = metrics.read_text()
                    lines = text[:text.rfind("\n") + 1].splitlines()  # a line still being written waits
                    now = time.perf_counter() - start
                    for line in lines[seen:]:
                        if line.strip():
                            arrivals.append((json.loads(line)["step"], now))
                    seen = len(lines)
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        code = proc.wait()
        done.set()
        watcher.join()
    if code:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{' '.join(cmd[2:])} failed (exit {code}):\n{tail}")
    return time.perf_counter() - start, arrivals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=420.0, help="wall budget of the training command")
    p.add_argument("--calibration-steps", type=int, default=300)
    p.add_argument("--margin", type=float, default=0.05, help="share of the budget kept for checkpoints")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/teacher_in_budget"))
    p.add_argument("--out", type=Path, required=True, help="where the export, config and summary are copied")
    p.add_argument("overrides", nargs="*", help="config overrides (after --)")
    args = p.parse_args(argv)
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)

    calib = args.work_dir / "calibration"
    wall, arrivals = run_and_watch(
        COMMAND + [f"run.out_dir={calib}", f"run.steps={args.calibration_steps}", "run.log_every=10",
                   "run.sample_every=0", "run.ckpt_every=0", *args.overrides],
        calib / "metrics.jsonl", args.work_dir / "calibration.log")
    per_step = seconds_per_step(arrivals)
    fixed = max(0.0, wall - args.calibration_steps * per_step)
    warmup = int(OmegaConf.load(calib / "config.yaml").optim.warmup_steps)
    steps = steps_that_fit(args.seconds, fixed, per_step, args.margin * args.seconds, warmup)
    print(f"calibration: {args.calibration_steps} steps in {wall:.1f} s = {1e3 * per_step:.1f} ms a step + "
          f"{fixed:.1f} s fixed; training {steps} steps in a {args.seconds:.0f} s budget", flush=True)

    run = args.work_dir / "run"
    wall, _ = run_and_watch(
        COMMAND + [f"run.out_dir={run}", f"run.steps={steps}", "run.sample_every=0", f"run.ckpt_every={steps // 4}",
                   *args.overrides],
        run / "metrics.jsonl", args.out / "train.log")
    for name in ("model.safetensors", "dmd_dar.json", "samples_grid.png"):
        shutil.copy2(run / "export" / name, args.out / name)
    shutil.copy2(run / "config.yaml", args.out / "config.yaml")
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = {"steps": steps, "train_wall_s": round(wall, 1), "budget_s": args.seconds,
               "calibration_ms_per_step": round(1e3 * per_step, 2), "calibration_fixed_s": round(fixed, 1),
               "final_logged_loss": losses[-1] if losses else None, "overrides": args.overrides}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
