"""Config layering, validation messages and the CLI surface."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dmd_dar import cli
from dmd_dar.cli import COMMANDS, CONFIG_DIR, find_command, main, resolve
from dmd_dar.config import build_config, diff_configs, load_yaml
from dmd_dar.distill.config import DistillConfig, MethodConfig
from dmd_dar.errors import UserError
from dmd_dar.routing import RoutingConfig
from dmd_dar.training.optim import OptimConfig
from dmd_dar.training.run import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_every_command_has_help(capsys):
    assert main([]) == 0
    listing = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd.name in listing
        with pytest.raises(SystemExit) as exc:
            main([cmd.name, "--help"])
        assert exc.value.code == 0


@pytest.mark.parametrize("cmd", [c for c in COMMANDS])
def test_every_command_resolves_its_default_config(cmd):
    assert resolve(cmd, [], []) is not None


def test_dry_run_prints_the_resolved_config(capsys):
    assert main(["distill", "--dry-run", "method.ttur=3"]) == 0
    out = capsys.readouterr().out
    assert "ttur: 3" in out and "student_routing:" in out


def test_unknown_key_names_it_and_lists_valid_ones(capsys):
    assert main(["distill", "--dry-run", "method.tturr=3"]) == 2
    err = capsys.readouterr().err
    assert "method.tturr" in err and "did you mean 'ttur'" in err and "guidance_scale" in err


def test_wrong_type_names_the_key(capsys):
    assert main(["distill", "--dry-run", "method.ttur=often"]) == 2
    assert "method.ttur" in capsys.readouterr().err


def test_yaml_layers_apply_in_order(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("method:\n  ttur: 2\n  guidance_scale: 3.0\n")
    b.write_text("method:\n  ttur: 7\n")
    cfg = build_config(DistillConfig, [a, b], ["run.steps=9"])
    assert (cfg.method.ttur, cfg.method.guidance_scale, cfg.run.steps) == (7, 3.0, 9)


def test_mixed_precision_no_survives_yaml_booleans(tmp_path):
    # YAML 1.1 turns a bare `no` into false; the documented value must still work, on the command line and in a file
    assert build_config(DistillConfig, [], ["run.mixed_precision=no"]).run.mixed_precision == "no"
    layer = tmp_path / "run.yaml"
    layer.write_text("run:\n  mixed_precision: no\n")
    assert build_config(DistillConfig, [layer]).run.mixed_precision == "no"
    assert build_config(DistillConfig, [], ["run.mixed_precision=bf16"]).run.mixed_precision == "bf16"
    with pytest.raises(UserError, match="run.mixed_precision='yes'"):
        build_config(DistillConfig, [], ["run.mixed_precision='yes'"])


def test_bad_yaml_and_missing_file_are_user_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        build_config(DistillConfig, [bad])
    with pytest.raises(UserError, match="not found"):
        build_config(DistillConfig, [tmp_path / "missing.yaml"])


def test_validation_runs_after_merging(capsys):
    assert main(["distill", "--dry-run", "method.t_min=0.9", "method.t_max=0.1"]) == 2
    assert "t_min" in capsys.readouterr().err


def test_guidance_interval_is_checked_and_named(capsys):
    assert main(["distill", "--dry-run", "method.guidance_interval=[0.3,0.9]"]) == 0
    assert "guidance_interval:\n  - 0.3\n  - 0.9" in capsys.readouterr().out
    assert main(["distill", "--dry-run", "method.guidance_interval=[0.9,0.3]"]) == 2
    assert "method.guidance_interval=[0.9, 0.3]: need 0 <= lo < hi <= 1" in capsys.readouterr().err
    assert main(["train-teacher", "--dry-run", "diffusion.cfg_interval=[0.5]"]) == 2
    assert "diffusion.cfg_interval" in capsys.readouterr().err
    assert main(["sample", "--dry-run", "cfg_interval=[0.5,1.5]"]) == 2
    assert "cfg_interval=[0.5, 1.5]" in capsys.readouterr().err


def test_override_without_equals_is_rejected(capsys):
    assert main(["distill", "--dry-run", "method.ttur"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_runs_in_one_process_may_change_mixed_precision(tmp_path):
    """The study runs fp32 distillation and then bf16 teacher pretraining in one process; accelerate's global state
    must not pin the first run's precision."""
    from dmd_dar.training.run import RunConfig, make_accelerator

    for precision in ("no", "bf16", "no"):
        run = RunConfig(out_dir=str(tmp_path / precision), mixed_precision=precision, log_with="none", cpu=True)
        assert make_accelerator(run, "test").mixed_precision == precision


def _python_m_dmd_dar(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dmd_dar", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def test_python_m_dmd_dar_is_the_cli(capsys):
    assert main(["distill", "--dry-run", "method.ttur=4"]) == 0
    in_process = capsys.readouterr().out
    done = _python_m_dmd_dar("distill", "--dry-run", "method.ttur=4")
    assert done.returncode == 0 and done.stdout == in_process
    bad = _python_m_dmd_dar("distill", "--dry-run", "method.tturr=4")
    assert bad.returncode == 2 and "dmd-dar distill: error: " in bad.stderr and "method.tturr" in bad.stderr


def test_teacher_kind_accepts_only_its_choices(capsys):
    assert main(["distill", "--dry-run", "networks.teacher_kind=foo"]) == 2
    err = capsys.readouterr().err
    assert "networks.teacher_kind='foo'" in err and "native, diffusers" in err
    assert main(["distill", "--dry-run", "networks.teacher_kind=diffusers"]) == 0


@pytest.mark.parametrize("command, override, named", [
    ("distill", "generator_optim.lr=-1", "generator_optim.lr=-1.0 must be > 0"),
    ("distill", "fake_optim.lr=0", "fake_optim.lr=0.0 must be > 0"),
    ("distill", "fake_optim.decay=linear", "fake_optim.decay='linear'"),
    ("distill", "networks.student_routing.query=foo", "networks.student_routing.query='foo' is not valid"),
    ("distill", "networks.fake_routing.chunk_size=0", "networks.fake_routing.chunk_size=0 must be >= 1"),
    ("train-teacher", "model.routing.kind=foo", "model.routing.kind='foo' is not valid"),
    ("train-teacher", "optim.warmup_steps=-1", "optim.warmup_steps=-1 must be >= 0"),
])
def test_shared_schemas_name_the_key_as_written(capsys, command, override, named):
    """OptimConfig and RoutingConfig sit at several places; each error names the place the user wrote."""
    assert main([command, "--dry-run", override]) == 2
    assert named in capsys.readouterr().err


def test_schemas_built_in_code_keep_their_usual_key_names():
    with pytest.raises(UserError, match=r"^optim\.lr=-1 must be > 0"):
        OptimConfig(lr=-1)
    with pytest.raises(UserError, match=r"^routing\.query='foo'"):
        RoutingConfig(query="foo")


@pytest.mark.parametrize("command, override, key", [
    ("distill", "method.guidance_scale=nan", "method.guidance_scale"),
    ("distill", "generator_optim.lr=inf", "generator_optim.lr"),
    ("distill", "method.regression_weight=-inf", "method.regression_weight"),
    ("distill", "method.guidance_interval=[0.2,nan]", "method.guidance_interval[1]"),
    ("distill", "fake_optim.betas=[0.9,inf]", "fake_optim.betas[1]"),
    ("train-teacher", "diffusion.cfg_scale=nan", "diffusion.cfg_scale"),
    ("sample", "cfg_scale=inf", "cfg_scale"),
    ("eval", "hf_cutoff=nan", "hf_cutoff"),
    ("diagnose", "t_grid=[0.5,nan]", "t_grid[1]"),
    ("train-clip", "lr=nan", "lr"),
])
def test_non_finite_floats_are_rejected_by_name(capsys, command, override, key):
    assert main([command, "--dry-run", override]) == 2
    err = capsys.readouterr().err
    assert f"error: {key}=" in err and "must be finite numbers" in err


def test_non_finite_floats_in_a_yaml_layer_are_rejected(tmp_path):
    layer = tmp_path / "nan.yaml"
    layer.write_text("method:\n  dm_weight: .nan\n")
    with pytest.raises(UserError, match=r"method\.dm_weight=nan"):
        build_config(DistillConfig, [layer])


@pytest.mark.parametrize("override, named", [
    ("method.gan_weight=-0.1", "method.gan_weight=-0.1 must be >= 0"),
    ("method.regression_weight=-1", "method.regression_weight=-1.0 must be >= 0"),
    ("method.fake_t_min=1.0", "method.fake_t_min=1.0, method.fake_t_max=1.0: need 0 <= fake_t_min < fake_t_max"),
    ("method.gan_max_t=0", "method.gan_max_t=0.0 must lie in (0, 1]"),
    ("method.regression_steps=0", "method.regression_steps=0 must be >= 1"),
    ("ema_decay=1.0", "ema_decay=1.0 must lie in [0, 1)"),
    ("max_bad_steps=0", "max_bad_steps=0 must be >= 1"),
    ("debug_grid_every=-1", "debug_grid_every=-1 must be >= 0"),
    ("generator_optim.routing_lr=-1e-3", "generator_optim.routing_lr=-0.001 must be > 0"),
    ("fake_optim.weight_decay=-0.1", "fake_optim.weight_decay=-0.1 must be >= 0"),
    ("generator_optim.betas=[0.9,1.0]", "generator_optim.betas=[0.9, 1.0]: both must lie in [0, 1)"),
    ("t2i.lora_alpha=0", "t2i.lora_alpha=0.0 must be > 0"),
    ("t2i.reference_samples=-1", "t2i.reference_samples=-1 must be >= 0"),
])
def test_distill_ranges_are_checked_and_named(capsys, override, named):
    assert main(["distill", "--dry-run", override]) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("override, named", [
    ("num_per_class=0", "num_per_class=0 must be >= 1"),
    ("num_per_class=-1", "num_per_class=-1 must be >= 1"),
    ("batch_size=0", "batch_size=0 must be >= 1"),
    ("steps=0", "steps=0 must be >= 1, or null"),
    ("classes=[]", "classes=[] selects no class"),
])
def test_sample_counts_are_checked_before_sampling(capsys, override, named):
    """These used to reach the sampler (torch.cat of no images, range() with step 0, or 0 steps read as 'default');
    --dry-run resolves, and so validates, exactly what a run would."""
    assert main(["sample", "--dry-run", override]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1


@pytest.mark.parametrize("override, named", [
    ("batch_size=0", "batch_size=0 must be >= 1"),
    ("spectral_bins=0", "spectral_bins=0 must be >= 1"),
    ("grid_per_group=-1", "grid_per_group=-1 must be >= 1"),
    ("diversity_max_per_group=1", "diversity_max_per_group=1 must be >= 2"),
])
def test_eval_counts_are_checked_before_evaluating(capsys, override, named):
    assert main(["eval", "--dry-run", override]) == 2
    assert named in capsys.readouterr().err


def test_distill_starts_from_the_main_job_yaml(tmp_path, monkeypatch):
    """`dmd-dar distill` with no arguments is configs/distill_embedded.yaml over the schema's library defaults."""
    recipe = (CONFIG_DIR / "distill_embedded.yaml").read_text()
    assert "  ttur: 3\n" in recipe
    (tmp_path / "distill_embedded.yaml").write_text(recipe.replace("  ttur: 3\n", "  ttur: 7\n"))
    monkeypatch.setattr(cli, "CONFIG_DIR", tmp_path)
    assert resolve(find_command("distill"), [], []).method.ttur == 7


def test_the_main_job_recipe_is_written_only_in_its_yaml():
    """The schema's defaults are the library's (plain DMD2, generic optimiser and run), and every value in which
    `dmd-dar distill` differs from them is a key of configs/distill_embedded.yaml, with that file's value."""
    defaults = DistillConfig()
    assert defaults.method == MethodConfig() and defaults.method.regression_weight == 0.0
    assert defaults.generator_optim == OptimConfig() and defaults.fake_optim == OptimConfig()
    assert defaults.run.steps == RunConfig().steps and defaults.run.batch_size == RunConfig().batch_size
    main_job = resolve(find_command("distill"), [], [])
    recipe = load_yaml(CONFIG_DIR / "distill_embedded.yaml")
    changed = diff_configs(defaults, main_job)
    assert {"method.ttur", "method.regression_weight", "generator_optim.warmup_steps", "run.steps"} <= set(changed)
    main_job_values = OmegaConf.structured(main_job)
    for key in changed:
        assert OmegaConf.select(recipe, key) == OmegaConf.select(main_job_values, key), key


def test_a_default_layer_is_read_from_configs_only(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "distill_embedded.yaml").write_text("method:\n  ttur: 9\n")  # a file of that name here is not it
    assert resolve(find_command("distill"), [], []).method.ttur == 3
    monkeypatch.setattr(cli, "CONFIG_DIR", tmp_path / "no_configs")  # a non-editable install has no configs/
    assert main(["distill", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "distill_embedded.yaml: the default config layer of dmd-dar distill is missing" in err
    assert err.count("\n") == 1
