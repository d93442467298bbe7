"""``dmd-dar <command>``: every command is a typed config plus a ``run(cfg)`` function.

    dmd-dar <command> [-c layer.yaml ...] [--dry-run] [key=value ...]

Config layers and overrides are applied in order on top of the command's defaults (see ``dmd_dar.config``): its
schema's defaults, then its default layers under configs/ (``distill``: the main job, configs/distill_embedded.yaml).
The configs ship inside the package (``dmd_dar/configs``: in a source checkout a link to the top-level configs/,
in a wheel its copy), so ``-c t2i/qwen_image.yaml`` and ``-c configs/t2i/qwen_image.yaml`` work after any install;
a local file of the name given wins for ``-c``, never for a command's default layers.
``python -m dmd_dar`` is the same entry point.
``--dry-run`` prints the resolved config and exits. Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

from dmd_dar.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data (see the module docstring)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    schema: str  # "module:Class"
    runner: str  # "module:function"
    default_layers: tuple[str, ...] = ()  # files under configs/, applied before the user's layers (a recipe)


COMMANDS = [
    Command("train-teacher", "Train a diffusion transformer teacher (the embedded default: on procedural images).",
            "dmd_dar.training.teacher:TeacherConfig", "dmd_dar.training.teacher:run"),
    Command("distill", "DMD2-distill a teacher into a one- or few-step (DAR) student.",
            "dmd_dar.distill.config:DistillConfig", "dmd_dar.distill.trainer:run",
            default_layers=("distill_embedded.yaml",)),  # the main job's recipe, written only there
    Command("sample", "Sample a PNG grid and a folder of PNGs with a manifest from any checkpoint.",
            "dmd_dar.sampling:SampleConfig", "dmd_dar.sampling:run"),
    Command("eval", "Evaluate folders of images: spectral detail, CLIP score, LPIPS, FD/CMMD; writes a report.",
            "dmd_dar.evaluation:EvalConfig", "dmd_dar.evaluation:run"),
    Command("diagnose", "Routing diagnostics of a checkpoint over depth x timestep (plots + JSON).",
            "dmd_dar.analysis.diagnose:DiagnoseConfig", "dmd_dar.analysis.diagnose:run"),
    Command("train-clip", "Train the small in-domain CLIP on the embedded dataset (for offline CLIP/FD/CMMD).",
            "dmd_dar.metrics.train_clip:TrainClipConfig", "dmd_dar.metrics.train_clip:run"),
    Command("study", "Run the DAR-vs-residual detail study from an eval/ suite (resumable).",
            "dmd_dar.study:StudyConfig", "dmd_dar.study:run"),
]


def _load(ref: str):
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def _layer_path(name: str) -> Path:
    """A ``-c`` layer: the file ``name`` here, else ``name`` under the shipped configs (also when written as
    ``configs/<name>``, the source checkout's path), with or without ``.yaml``."""
    path = Path(name)
    if path.is_file():
        return path
    relative = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) and len(path.parts) > 1 else path
    for candidate in dict.fromkeys([CONFIG_DIR / path, CONFIG_DIR / relative]):
        for file in (candidate, candidate.with_suffix(".yaml")):
            if file.is_file():
                return file
    raise UserError(f"{name}: config file not found (looked here and in {CONFIG_DIR}); pass an existing YAML file")


def _default_layer_path(command: Command, name: str) -> Path:
    """A command's default layer: only ever the shipped file (a file of that name here must not replace it)."""
    path = CONFIG_DIR / name
    if not path.is_file():
        raise UserError(f"{path}: the default config layer of dmd-dar {command.name} is missing; reinstall "
                        f"dmd-dar (its configs ship inside the package, dmd_dar/configs)")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmd-dar",
        description="DMD2 distillation of diffusion transformers with Diffusion-Adaptive Routing, "
                    "and an evaluation suite for fine detail.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for cmd in COMMANDS:
        starts = "".join(f" Starts from configs/{name}." for name in cmd.default_layers)
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help + starts + " Settings are config keys: "
                           "give YAML layers with -c and key=value overrides; --dry-run shows them all.")
        p.add_argument("-c", "--config", action="append", default=[], metavar="YAML",
                       help="config layer (repeatable; later layers win); a path or a name under configs/")
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.depth=4")
    return parser


def find_command(name: str) -> Command:
    """The command called ``name`` (``distill``, ``sample`` ...)."""
    found = [c for c in COMMANDS if c.name == name]
    if not found:
        raise UserError(f"unknown command {name!r}; choose one of {', '.join(c.name for c in COMMANDS)}")
    return found[0]


def resolve(command: Command, layers: list[str], overrides: list[str]):
    """The validated config ``dmd-dar <command> -c <layers> <overrides>`` runs: the command's default layers, then
    ``layers``, then ``overrides``, on top of its schema's defaults."""
    # lazy: dmd_dar.config imports torch (seconds), which `dmd-dar --help` never needs
    from dmd_dar.config import build_config

    paths = [_default_layer_path(command, n) for n in command.default_layers] + [_layer_path(n) for n in layers]
    return build_config(_load(command.schema), paths, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    command = find_command(args.command)
    try:
        cfg = resolve(command, args.config, args.overrides)
        if args.dry_run:
            from dmd_dar.config import to_yaml  # lazy: see resolve()

            print(to_yaml(cfg), end="")
            return 0
        _load(command.runner)(cfg)
    except UserError as exc:
        print(f"dmd-dar {command.name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dmd-dar {command.name}: interrupted; the last saved checkpoint is intact", file=sys.stderr)
        return 130
    finally:
        # A run leaves its wrapped models (FSDP above all) in reference cycles that hold the process group. Left to
        # the interpreter's shutdown, the gloo group's threads are torn down with half an interpreter and the
        # process can abort after a successful run (SIGABRT, "terminate called without an active exception").
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
