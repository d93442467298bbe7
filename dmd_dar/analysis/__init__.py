"""Routing diagnostics over depth x timestep (DAR paper §3): computations in ``diagnostics``, figures in ``plots``,
the ``dmd-dar diagnose`` command in ``diagnose``."""

from dmd_dar.analysis.diagnostics import (
    diagnose_model,
    dropped_sublayer,
    per_token_rms,
    timestep_diagnostics,
    token_cosine,
)

__all__ = ["diagnose_model", "dropped_sublayer", "per_token_rms", "timestep_diagnostics", "token_cosine"]
