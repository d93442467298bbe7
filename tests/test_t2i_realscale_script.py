"""eval/gpu_dmd2_realscale.py: the real-scale config is SD3.5-medium's, and the --dry-run (tiny, CPU) runs the same
code path for both student routings and reports times, parameter counts and ratios."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "eval" / "gpu_dmd2_realscale.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_dmd2_realscale", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_realscale_config_is_sd35_medium_sized():
    from diffusers import SD3Transformer2DModel

    mod = _module()
    with torch.device("meta"):
        # pos_embed is a (numpy-built, 384^2 x 1536) buffer, not a parameter: a small table keeps this test fast
        model = SD3Transformer2DModel(**{**mod.SD35_MEDIUM, "pos_embed_max_size": 16})
    n = sum(p.numel() for p in model.parameters())
    assert 2.0e9 < n < 2.7e9  # SD3.5-medium's transformer: ~2.2B (2.5B with text projections in the pipeline)
    assert sum(b.use_dual_attention for b in model.transformer_blocks) == 13


def test_dry_run_reports_both_variants(tmp_path):
    mod = _module()
    out = tmp_path / "r.json"
    res = mod.main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text())["config"] == "tiny"
    v = res["variants"]
    assert set(v) == {"residual", "dar"}
    assert v["residual"]["router_params"] == 0 < v["dar"]["router_params"]
    assert all(r["finite"] and len(r["step_times_s"]) == 2 for r in v.values())
    assert res["ratios_dar_over_residual"]["step_time"] > 0
