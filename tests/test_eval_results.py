"""Typed evaluation results: metrics.json is written and read through the same classes, and a file that does not
match them (renamed, missing or ill-typed field, another schema) fails loudly, also in the report and the study."""

import copy
import json
import math

import pytest

from dmd_dar.config import build_config
from dmd_dar.evaluation import EvalConfig, Evaluation, run, write_report
from dmd_dar.evaluation.results import (
    SCHEMA,
    Available,
    Paired,
    ResultsFormatError,
    SpectralComparison,
    Unavailable,
    from_json,
    to_json,
)
from dmd_dar.metrics.bootstrap import Interval
from dmd_dar.study import aggregate as A


@pytest.fixture(scope="module")
def metrics_file(tmp_path_factory, eval_folders):
    root = tmp_path_factory.mktemp("results")
    eval_folders(root, size=16)
    run(build_config(EvalConfig, [], [f"samples=[{root / 'teacher'},{root / 'student'}]", f"reference={root / 'ref'}",
                                      "metrics=[spectral,lpips_fidelity]", "bootstrap=30", "report=false",
                                      f"out_dir={root / 'out'}"]))
    return root / "out" / "metrics.json"


def test_metrics_json_round_trips_through_the_types(metrics_file):
    raw = json.loads(metrics_file.read_text())
    assert raw["format"] == SCHEMA
    result = Evaluation.from_json(raw)
    assert to_json(result) == raw  # every field read back, none added or lost
    comp = result.comparison("student", "baseline")
    assert isinstance(comp.pairing, Paired) and comp.pairing.n == 6
    assert isinstance(comp.spectral, SpectralComparison) and isinstance(comp.spectral.hf_gap_db, Interval)
    assert isinstance(comp.lpips_fidelity, Unavailable) and "16x16" in comp.lpips_fidelity.reason  # too small
    assert isinstance(result.availability["spectral"], Available)
    assert result.verdicts == [c.verdict for c in result.comparisons] and result.hf_cutoff == 0.5


def test_nan_is_written_as_null_and_read_back_as_nan():
    iv = Interval(estimate=1.0, low=math.nan, high=math.inf, n=[3, 4], n_boot=10, confidence=0.9, seed=0)
    data = json.loads(json.dumps(to_json(iv), allow_nan=False))  # strict JSON
    assert data["low"] is None and data["high"] is None
    back = from_json(Interval, data)
    assert math.isnan(back.low) and math.isnan(back.high) and back.n == [3, 4] and back.estimate == 1.0


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["comparisons"][0]["spectral"].pop("hf_gap_db"), r"comparisons\[0\]\.spectral\.hf_gap_db: missing"),
    (lambda d: d["comparisons"][0]["spectral"].update(hf_gap=d["comparisons"][0]["spectral"].pop("hf_gap_db")),
     r"unknown field\(s\) \['hf_gap'\]"),
    (lambda d: d["sets"]["teacher"]["spectral"]["scalars"]["slope"].update(estimate="-2"), "expected a number"),
    (lambda d: d["sets"]["teacher"].update(n=6.5), r"sets\['teacher'\]\.n: expected an integer"),
    (lambda d: d.update(format="dmd_dar.eval/1"), "format 'dmd_dar.eval/1' is not 'dmd_dar.eval/2'"),
    (lambda d: d.update(format="dmd_dar.eval/1", verdicts=[]), "format 'dmd_dar.eval/1' is not"),  # a /1 file
])
def test_a_file_that_does_not_match_the_types_fails_naming_the_field(metrics_file, tmp_path, edit, match):
    data = copy.deepcopy(json.loads(metrics_file.read_text()))
    edit(data)
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ResultsFormatError, match=match):
        Evaluation.load(bad)
    with pytest.raises(ResultsFormatError, match=match):  # the report reads through the same types
        write_report(bad, tmp_path / "report")
    assert not (tmp_path / "report" / "report.html").exists()


def test_the_study_reads_the_typed_result(metrics_file):
    result = Evaluation.load(metrics_file)
    row = A.extract(result, "student")
    gap = result.comparison("student", "baseline").spectral.hf_gap_db
    assert row["hf_gap_db_vs_teacher"] == {"estimate": gap.estimate, "low": gap.low, "high": gap.high}
    assert row["lpips_fidelity"] is None and row["fd_vs_data"] is None  # unavailable / not computed
    per = A.extract_per_class(result, "student")
    assert set(per) == {"fur", "grass"} and per["fur"]["hf_gap_db_vs_teacher"]["estimate"] < 0
