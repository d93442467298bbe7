"""report.html from a tiny evaluation, parsed back: numbers equal metrics.json, images decode, plots written."""

import base64
import io
import json
from html.parser import HTMLParser

import pytest
from PIL import Image

from dmd_dar.config import build_config
from dmd_dar.evaluation import EvalConfig, Evaluation, run, write_report


class Parsed(HTMLParser):
    def __init__(self):
        super().__init__()
        self.values, self.images, self.verdicts, self._verdict = [], [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-value" in a:
            self.values.append((float(a["data-value"]), a.get("data-low"), a.get("data-high")))
        if tag == "img":
            self.images.append(a["src"])
        self._verdict = tag == "p" and a.get("class") == "verdict"

    def handle_data(self, data):
        if self._verdict:
            self.verdicts.append(data)
            self._verdict = False


@pytest.fixture(scope="module")
def report(tmp_path_factory, eval_folders):
    root = tmp_path_factory.mktemp("rep")
    eval_folders(root, size=32)
    bench = {"device": "cpu", "results": [{"metric": "spectral", "impl": "torch", "resolution": 256, "batch": 8,
                                           "images_per_s": 123.5}]}
    (root / "bench.json").write_text(json.dumps(bench))
    cfg = build_config(EvalConfig, [], [f"samples=[{root / 'teacher'},{root / 'student'}]", f"reference={root / 'ref'}",
                                        "metrics=[spectral,lpips_fidelity,lpips_diversity,fd]", "bootstrap=100",
                                        "bootstrap_fd=5", "lpips.random_backbone=true", "features.space=inception",
                                        f"features.inception_weights={root / 'missing.pth'}", f"out_dir={root / 'out'}",
                                        f"bench_json={root / 'bench.json'}"])
    run(cfg)
    out = root / "out"
    p = Parsed()
    p.feed((out / "report.html").read_text())
    return Evaluation.load(out / "metrics.json"), p, out


def _has(parsed, ci):
    return any(v == ci.estimate and float(lo) == ci.low and float(hi) == ci.high
               for v, lo, hi in parsed.values if lo is not None)


def test_tables_hold_the_numbers_of_metrics_json(report):
    m, p, _ = report
    for c in m.comparisons:
        assert _has(p, c.spectral.hf_gap_db) and _has(p, c.spectral.lsd_db)
        for g in c.spectral.per_group_hf_gap_db.values():
            assert _has(p, g.gap)
    assert _has(p, m.comparisons[2].lpips_fidelity.mean)
    for e in m.sets.values():
        for ci in e.spectral.scalars.values():
            assert _has(p, ci)
    assert _has(p, m.sets["student"].lpips_diversity.mean)
    assert any(v == 123.5 for v, _, _ in p.values)  # the bench table
    assert p.verdicts == m.verdicts


def test_images_decode_and_plots_are_written(report):
    m, p, out = report
    pngs = [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) for s in p.images]
    assert all(s.startswith("data:image/png;base64,") for s in p.images)
    assert len(pngs) == 2 * 3 + 3  # 2 groups x 3 sets, + 3 plots
    assert {im.format for im in pngs} == {"PNG"}
    for name in ("rapsd.png", "gap_db.png", "hf_gap_per_group.png"):
        assert Image.open(out / name).size[0] > 100
    assert "unavailable" in (out / "report.html").read_text()  # fd: missing inception weights
    again = write_report(out / "metrics.json")  # from the file alone
    assert again == out / "report.html"
