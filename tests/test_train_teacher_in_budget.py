"""eval/train_teacher_in_budget.py: the step time it fits and the run length it picks for a wall-clock budget."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "eval" / "train_teacher_in_budget.py"
_spec = importlib.util.spec_from_file_location("train_teacher_in_budget", _PATH)
budget = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(budget)


def test_step_time_is_the_slope_after_the_warm_up():
    # 3 s of start-up, then 40 ms a step; the first logged steps are slow (warm-up) and must not count
    arrivals = [(10, 5.0), (20, 5.6)] + [(s, 3.0 + 0.04 * s) for s in range(30, 301, 10)]
    assert budget.seconds_per_step(arrivals) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="two logged steps"):
        budget.seconds_per_step([(10, 1.0)])


def test_run_length_fits_the_budget_in_hundreds():
    steps = budget.steps_that_fit(seconds=420, fixed=30, per_step=0.036, margin=21, warmup=300)
    assert steps == 10200  # (420 - 21 - 30) / 0.036 = 10250 -> a multiple of 100
    assert 30 + steps * 0.036 <= 420 - 21
    with pytest.raises(SystemExit, match="warm-up steps"):
        budget.steps_that_fit(seconds=60, fixed=30, per_step=0.2, margin=3, warmup=300)
