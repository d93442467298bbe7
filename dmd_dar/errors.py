"""The single exception type for bad user input: its message names the problem and the fix.

A schema that sits at several places of a config (``OptimConfig`` as ``generator_optim`` and ``fake_optim``) names
its keys with :func:`config_key`, so that a message names the key the user wrote; ``dmd_dar.config`` validates
each nested schema inside :func:`config_section` with its dotted path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_SECTION: ContextVar[str | None] = ContextVar("dmd_dar_config_section", default=None)


class UserError(Exception):
    """Bad input from the user (a path, a config key, a file). The CLI prints it as one line and exits 2."""


def config_key(section: str, name: str) -> str:
    """The dotted key of field ``name`` of a schema whose usual place is ``section`` (``optim``, ``routing``).

    Inside :func:`config_section` the section is the schema's real place (``generator_optim``,
    ``networks.student_routing``; ``""`` at the top level); elsewhere (a schema built in code) it is ``section``.
    """
    where = _SECTION.get()
    where = section if where is None else where
    return f"{where}.{name}" if where else name


@contextmanager
def config_section(path: str) -> Iterator[None]:
    """Validation messages of schemas built in this block name their keys under ``path``."""
    token = _SECTION.set(path)
    try:
        yield
    finally:
        _SECTION.reset(token)
