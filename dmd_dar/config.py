"""Typed run configuration: dataclass schemas -> OmegaConf, YAML layers, ``key=value`` overrides, validation.

Every command has a dataclass schema (defined beside the code that uses it). A run's config is built as

    schema defaults  <-  YAML layer 1  <-  YAML layer 2 ...  <-  command-line ``key=value`` overrides

Unknown keys and wrong types are rejected with a message that names the key and lists the valid ones; nan and inf
are rejected for every key, and each schema's own range checks name the key as the user wrote it (a shared schema
such as ``OptimConfig`` included: ``generator_optim.lr``). The resolved config is saved as ``config.yaml`` in
every run directory, so a run can be repeated from it alone. YAML is parsed with OmegaConf (safe loading); no code
from a config is ever executed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from dmd_dar.errors import UserError, config_section
from dmd_dar.utils.io import atomic_write_text

T = TypeVar("T")


def _valid_keys(schema_node: DictConfig, dotted: str) -> list[str]:
    """The valid keys at the level of ``dotted`` in the schema."""
    node: Any = schema_node
    for part in dotted.split(".")[:-1]:
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
        else:
            break
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def _explain(exc: OmegaConfBaseException, schema_node: DictConfig, source: str) -> UserError:
    key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, ConfigKeyError | ConfigAttributeError):
        valid = _valid_keys(schema_node, key)
        leaf = key.split(".")[-1]
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return UserError(f"{source}: unknown config key '{key}'{hint}; valid keys here: {', '.join(valid)}")
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return UserError(f"{source}: bad value for config key '{key}': {msg}")
    return UserError(f"{source}: {str(exc).splitlines()[0]}")


def load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found; pass an existing YAML file (see configs/)")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from exc
    if not isinstance(cfg, DictConfig):
        raise UserError(f"{path}: a config file must hold a mapping of keys, not a {type(cfg).__name__}")
    return cfg


def build_config(schema: type[T], layers: list[str | Path] = (), overrides: list[str] = ()) -> T:
    """Build a validated ``schema`` instance from YAML layers and dotlist overrides.

    ``overrides`` are strings like ``"model.depth=4"`` or ``"routing.kind=dar"``.
    """
    base = OmegaConf.structured(schema)
    cfg = base
    for layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, load_yaml(layer))
        except OmegaConfBaseException as exc:
            raise _explain(exc, base, str(layer)) from exc
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value (for example model.depth=4)")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise _explain(exc, base, "command line") from exc
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"config keys without a value: {', '.join(missing)}; set them with key=value")
    try:
        _check_finite(OmegaConf.to_container(cfg, resolve=True))
        return _instantiate(cfg)
    except OmegaConfBaseException as exc:
        raise _explain(exc, base, "config") from exc


def _check_finite(value: Any, key: str = "") -> None:
    """Refuse nan and inf anywhere in a resolved config: YAML reads them as floats (``.nan``, and ``nan`` or
    ``inf`` given to a float key), and no setting of any command means anything with them (a nan guidance scale
    or learning rate trains on nan). Ranges of particular keys are their schema's ``__post_init__``."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key}={value}: config values must be finite numbers; set {key} to a finite value")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list | tuple):  # tuple-typed fields (optim.betas) come back as tuples
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")


def _instantiate(cfg: DictConfig) -> Any:
    """``OmegaConf.to_object``, whose dataclass ``__post_init__`` methods validate, with each nested schema first
    built on its own inside ``config_section(<its dotted path>)``.

    A schema used at several places (``OptimConfig`` as ``generator_optim`` and ``fake_optim``, ``RoutingConfig`` as
    ``networks.student_routing`` and ``model.routing``) then names the key the user wrote. Deepest first: a bad value
    fails in the innermost schema that holds it, before any enclosing one rebuilds that schema under its own path.
    """
    for path, node in _schema_nodes(cfg, ""):
        with config_section(path):
            OmegaConf.to_object(node)
    with config_section(""):
        return OmegaConf.to_object(cfg)


def _schema_nodes(node: DictConfig, prefix: str) -> list[tuple[str, DictConfig]]:
    """The dataclass-typed nodes below ``node`` with their dotted paths, children before their parents."""
    out: list[tuple[str, DictConfig]] = []
    for key in node.keys():
        child = node[key]
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            out += _schema_nodes(child, f"{prefix}{key}.")
            out.append((f"{prefix}{key}", child))
    return out


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: Any, run_dir: str | Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (atomically)."""
    return atomic_write_text(to_yaml(cfg), Path(run_dir) / "config.yaml")


def load_saved_config(schema: type[T], path: str | Path) -> T:
    """Rebuild a schema instance from a saved ``config.yaml``."""
    return build_config(schema, [path])


def diff_configs(old: Any, new: Any, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (for refusing a resume with a changed config)."""
    a, b = _flatten(to_dict(old)), _flatten(to_dict(new))
    keys = sorted(set(a) | set(b))
    return [k for k in keys if a.get(k) != b.get(k) and not any(k == i or k.startswith(i + ".") for i in ignore)]


def check_resume_config(schema: type, cfg: Any, run_dir: str | Path, ignore: tuple[str, ...]) -> None:
    """Refuse to resume ``run_dir`` with a config that differs from its saved one outside ``ignore``.

    Keys such as the step budget or the logging cadence may change on resume; anything that changes what is
    trained makes the resumed run a different experiment, so the error names the keys that differ.
    """
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        return
    changed = diff_configs(load_saved_config(schema, saved), cfg, ignore=ignore)
    if changed:
        raise UserError(f"{run_dir}: resuming with a changed config ({', '.join(changed)}); use a new "
                        f"run.out_dir, or run.resume=false to start over in place")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
