"""``run.compile``: torch.compile for the forwards of the networks a command runs, with a fallback to eager.

``compile_forward(module, mode, name)`` replaces ``module.forward`` (an instance attribute: the module tree,
its parameters and its state-dict keys stay exactly as they were, so checkpoints, EMA and exports never see a
compiled wrapper). The compiled callable takes the module as an argument, so a ``copy.deepcopy`` of the module
runs its own weights.

A compile failure never ends a run: a platform that cannot compile (no C++ compiler, an unsupported Python, an
old compiler) is found by a probe that compiles a forward and a backward once per process and mode, and a
failure at a network's first compiled call (compilation is lazy) switches that network back to eager. Either way
one warning line names the network and the cause.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from dmd_dar.errors import UserError, config_key

log = logging.getLogger("dmd_dar")

COMPILE_MODES = ("false", "default", "max-autotune")
RECOMPILE_LIMIT = 64


def check_compile_mode(value, section: str = "run") -> str:
    """The normalised ``compile`` value: YAML reads a bare ``false`` as a boolean; anything else not in
    ``COMPILE_MODES`` is a ``UserError`` naming the key."""
    text = str(value)
    if text in ("False", "false"):
        return "false"
    if text in ("True", "true"):  # YAML's boolean true: compiling, but in which mode?
        raise UserError(f"{config_key(section, 'compile')}=true names no mode; use "
                        f"{config_key(section, 'compile')}=default (or max-autotune)")
    if text not in COMPILE_MODES:
        raise UserError(f"{config_key(section, 'compile')}={value!r} is not valid; choose one of "
                        f"{', '.join(COMPILE_MODES)} (default: torch.compile's default mode)")
    return text


def _first_line(exc: BaseException) -> str:
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


@functools.cache
def _platform_failure(mode: str, device: str) -> str | None:
    """Why torch.compile cannot run on ``device`` in ``mode`` (a forward and backward of a small function; the
    backward is compiled lazily, at a run's first backward, where it could not fall back), or None."""
    try:
        fn = torch.compile(lambda x: (torch.sin(x) * x).sum(), mode=mode, fullgraph=True)
        x = torch.randn(8, device=device, requires_grad=True)
        fn(x).backward()
    except Exception as exc:  # any failure means: do not compile on this platform
        return _first_line(exc)
    return None


class CompiledForward:
    """``module.forward`` replaced by its compiled version; falls back to the eager forward on a compile error.

    A failing compiled call is re-run eagerly: when eager succeeds the failure was the compiler's (warn once,
    stay eager); when eager fails too, that error is the caller's and is raised as it is.
    """

    def __init__(self, module: nn.Module, compiled, name: str, setting: str) -> None:
        self.module, self.compiled, self.name, self.setting = module, compiled, name, setting
        self.eager = False

    def _eager(self, *args, **kwargs):
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        if self.eager or torch.compiler.is_compiling():  # inside another compiled network: traced as part of it
            return self._eager(*args, **kwargs)
        try:
            return self.compiled(self.module, *args, **kwargs)
        except Exception as exc:
            out = self._eager(*args, **kwargs)
            self.eager = True
            log.warning(f"warning: {self.setting}: compiling {self.name} failed ({_first_line(exc)}); running it "
                        f"eager")
            return out


def compile_forward(module: nn.Module, mode: str, name: str, key: str = "run.compile") -> nn.Module:
    """Compile ``module``'s forward in place for ``mode`` (``COMPILE_MODES``; "false" leaves it alone).

    Returns ``module``. Where the platform cannot compile, one warning line (naming ``key``, ``name`` and the
    cause) and nothing changes.
    """
    if mode == "false" or isinstance(module.__dict__.get("forward"), CompiledForward):
        return module
    param = next(module.parameters(), None)
    reason = _platform_failure(mode, "cpu" if param is None else param.device.type)
    if reason is None:
        try:
            compiled = torch.compile(type(module).forward, mode=mode)
        except Exception as exc:
            reason = _first_line(exc)
    if reason is not None:
        log.warning(f"warning: {key}={mode}: torch.compile is unavailable here ({reason}); {name} runs eager")
        return module
    # Dynamo caches compiled graphs per code object, so networks of one class (student, fake score and teacher
    # are all SiTs) share SiT.forward's entries: one per network, grad mode and input shape. Past the limit
    # (8 by default) dynamo silently runs eager; room for all of them.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    module.forward = CompiledForward(module, compiled, name, f"{key}={mode}")
    return module


def is_compiled(module: nn.Module) -> bool:
    """Whether ``compile_forward`` compiled ``module``'s forward (and it has not fallen back to eager)."""
    wrapper = module.__dict__.get("forward")
    return isinstance(wrapper, CompiledForward) and not wrapper.eager
