"""Decoupled DMD with diffusers teachers, end to end on the tiny random pipelines: an SD3-like teacher (two-pass
CFG: CA + DM, random schedule, sampled at other step counts) and a Flux-like one (embedded guidance: CA refused,
DM alone)."""

import json

from test_t2i_roundtrip import distill_args, root  # noqa: F401  (root: the tiny pipelines fixture)

from dmd_dar.cli import main
from dmd_dar.data.manifest import read_manifest

DECOUPLED = ("method.objective=decoupled", "method.ca_guidance_scale=3.0", "method.schedule=random",
             "method.k_min=1", "method.k_max=3")


def test_sd3_decoupled_distills_and_samples_at_any_step_count(root):  # noqa: F811
    out = root / "run_sd3_decoupled"
    assert main(["distill", *distill_args(root, "sd3", out, *DECOUPLED, "method.regularizer=meanvar")]) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["gen/ca_norm"] > 0 and "gen/meanvar_kl" in r and "drift/image_var_ratio" in r for r in logs)
    assert not any(k.startswith("critic/") for r in logs for k in r)  # meanvar: no fake score, no critic
    images = []
    for k in (1, 3):
        folder = root / f"samples_sd3_decoupled_{k}"
        assert main(["sample", f"checkpoint={out}", "prompt=a cat on a mat", "num_per_class=1", f"steps={k}",
                     f"out_dir={folder}", "device=cpu"]) == 0
        images.append((folder / read_manifest(folder)[0]["file"]).read_bytes())
    assert images[0] != images[1]


def test_flux_embedded_guidance_refuses_ca_and_runs_dm_alone(root, capsys):  # noqa: F811
    assert main(["distill", *distill_args(root, "flux", root / "run_flux_ca", *DECOUPLED)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (the lines above: pipeline-loading progress bars)
    assert "method.ca_weight=0" in last and "embedded guidance" in last
    out = root / "run_flux_dm"
    assert main(["distill", *distill_args(root, "flux", out, *DECOUPLED, "method.ca_weight=0")]) == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("gen/ca_norm" not in r and "critic/fake_loss" in r for r in logs)
    # The fake score starts as the teacher with its guidance input fixed to t2i.embedded_guidance (default:
    # method.guidance_scale): DM reads the teacher at that same guidance, so it is exactly 0 until the fake
    # score has moved (read at guidance 1 it would not be).
    assert logs[0]["gen/dm_norm"] == 0 and logs[1]["gen/dm_norm"] > 0
