"""The configs (and the ``detail`` prompt set) ship inside the package: ``-c NAME`` resolves to them from any
working directory, a local file of the same name wins, and a wheel built from this tree carries them, so a
non-editable install runs ``dmd-dar distill`` (the main job) and ``-c t2i/qwen_image.yaml``."""

import importlib.resources
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dmd_dar.cli import find_command, resolve

ROOT = Path(__file__).resolve().parent.parent


def test_configs_are_package_resources():
    configs = importlib.resources.files("dmd_dar") / "configs"
    assert (configs / "distill_embedded.yaml").is_file() and (configs / "t2i" / "qwen_image.yaml").is_file()
    assert (configs / "t2i" / "qwen_image.yaml").read_text() == (ROOT / "configs/t2i/qwen_image.yaml").read_text()
    assert (importlib.resources.files("dmd_dar") / "prompt_sets" / "detail_prompts.txt").is_file()


def test_layer_names_resolve_from_anywhere_and_a_local_file_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    distill = find_command("distill")
    for name in ("t2i/qwen_image.yaml", "configs/t2i/qwen_image.yaml", "t2i/qwen_image"):
        assert resolve(distill, [name], []).t2i.model == "Qwen/Qwen-Image", name
    (tmp_path / "t2i").mkdir()
    (tmp_path / "t2i" / "qwen_image.yaml").write_text("t2i:\n  model: /local/qwen\n")
    assert resolve(distill, ["t2i/qwen_image.yaml"], []).t2i.model == "/local/qwen"


_CHECK = r"""
import sys
import dmd_dar
from dmd_dar.cli import main
from dmd_dar.t2i.prompts import load_prompts
assert dmd_dar.__file__.startswith(sys.argv[1]), dmd_dar.__file__  # the wheel's copy, not the source tree
assert main(["distill", "--dry-run"]) == 0
assert main(["distill", "-c", "t2i/qwen_image.yaml", "--dry-run"]) == 0
assert main(["distill", "-c", "configs/t2i/flux_dev.yaml", "--dry-run"]) == 0
assert len(load_prompts("configs/t2i/imagenet_class_ids.txt")) == 1000 and load_prompts("detail")
"""


@pytest.mark.slow
def test_a_wheel_built_from_this_tree_ships_the_configs(tmp_path):
    src = tmp_path / "src"  # a copy, so the build's own files (build/, *.egg-info) stay out of the checkout
    for name in ("dmd_dar", "configs", "eval", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"symlinks": True, "ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / name).is_dir() else {}))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "wheel"), "-q"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("dmd_dar-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"dmd_dar/configs/distill_embedded.yaml", "dmd_dar/configs/t2i/qwen_image.yaml",
            "dmd_dar/configs/accelerate/fsdp_8gpu.yaml", "dmd_dar/prompt_sets/detail_prompts.txt"} <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts into site-packages
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHECK, str(site)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
