"""Noise paths: how data and noise mix at time ``t`` and how a network's prediction converts to x0, eps, velocity, score.

Every path is linear, ``x_t = alpha(t) x0 + sigma(t) eps`` with ``t`` in ``[0, 1]`` (``t = 1`` is the noise end,
see docs/CONVENTIONS.md). A prediction type names what the network outputs; all conversions go through the pair
``(x0, eps)``, which is linear in ``(x_t, pred)`` at fixed ``t``:

=============  ==========================================  ==========================================
prediction     x0 from (pred, x_t)                         eps from (pred, x_t)
=============  ==========================================  ==========================================
``x0``         ``pred``                                    ``(x_t - alpha pred) / sigma``
``eps``        ``(x_t - sigma pred) / alpha``              ``pred``
``v``          ``(alpha x_t - sigma v) / (alpha^2+sigma^2)``  ``(sigma x_t + alpha v) / (alpha^2+sigma^2)``
``velocity``   ``(x_t - sigma v) / (alpha + sigma)``       ``x0 + v``
=============  ==========================================  ==========================================

``v`` is the VP "v-prediction" ``v = alpha eps - sigma x0``; ``velocity`` is the rectified-flow velocity
``v = eps - x0 = d x_t / dt``. Divisions by ``alpha`` (zero at ``t = 1`` for flow) and by ``sigma`` (zero at ``t = 0``
for flow) are guarded by clamping the divisor to at least ``min_divisor`` (default 1e-4): the conversion is
ill-posed there, and the clamp keeps it finite instead of returning inf/nan. The VP schedule never gets that close
(alpha >= 0.0064, sigma >= 0.01), so the clamp only matters for flow paths at their end points.

Conversions compute in ``path.compute_dtype`` (float32 by default, float64 on request) or the inputs' dtype if wider,
and return the promoted dtype of the tensor inputs (so a bf16 prediction with a float32 ``x_t`` gives float32).
"""

from __future__ import annotations

import torch

from dmd_dar.errors import UserError

Tensor = torch.Tensor

__all__ = ["NoisePath", "RectifiedFlow", "VPPath", "make_path", "PATH_KINDS", "bcast"]


def bcast(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a per-sample time ``t`` ([B], [] or a float) against ``x`` of shape [B, ...]."""
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"t must have shape [B] with B={x.shape[0]} (or be a scalar), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))  # [B, 1, 1, 1]


class NoisePath:
    """Base class for a linear noise path. Subclasses define ``_alpha_sigma_t`` (on a float tensor ``t``) and
    ``_dalpha_dsigma_t`` (time derivatives), and the allowed prediction types. Stateless apart from constants."""

    kind: str = ""
    predictions: tuple[str, ...] = ()

    def __init__(self, prediction: str, dtype: torch.dtype = torch.float32, min_divisor: float = 1e-4):
        if prediction not in self.predictions:
            raise UserError(f"prediction {prediction!r} is not supported by the {self.kind!r} path; "
                            f"use one of {list(self.predictions)}")
        if dtype not in (torch.float32, torch.float64):
            raise UserError(f"path dtype must be float32 or float64, got {dtype}")
        self.prediction = prediction
        self.compute_dtype = dtype
        self.min_divisor = float(min_divisor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prediction={self.prediction!r})"

    # ---- schedule -------------------------------------------------------------------------------------------
    def _alpha_sigma_t(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _dalpha_dsigma_t(self, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _dtype(self, *xs: Tensor) -> tuple[torch.dtype, torch.dtype]:
        """(output dtype, compute dtype) for the given tensor inputs."""
        out = xs[0].dtype
        for x in xs[1:]:
            out = torch.promote_types(out, x.dtype)
        if not out.is_floating_point:
            out = torch.float32
        return out, torch.promote_types(out, self.compute_dtype)

    def alpha_sigma(self, t: Tensor | float, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(alpha(t), sigma(t))`` in the compute dtype; broadcast against ``like`` ([B, ...]) when given."""
        dev = like.device if like is not None else None
        tt = torch.as_tensor(t, device=dev).to(self.compute_dtype)
        if like is not None:
            tt = bcast(tt, like)
        return self._alpha_sigma_t(tt)

    def log_snr(self, t: Tensor | float) -> Tensor:
        """``log(alpha^2 / sigma^2)``; +inf at the data end of a flow path."""
        a, s = self.alpha_sigma(t)
        return 2 * (torch.log(a) - torch.log(s))

    # ---- forward process --------------------------------------------------------------------------------------
    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """``x_t = alpha(t) x0 + sigma(t) eps`` with per-sample ``t`` [B]."""
        out, _ = self._dtype(x0, eps)
        a, s = self.alpha_sigma(t, like=x0)
        return (a * x0 + s * eps).to(out)

    def x0_eps_to_pred(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """The prediction of this path's type for a given (x0, eps) pair at time ``t``."""
        out, cd = self._dtype(x0, eps)
        x0c, epsc = x0.to(cd), eps.to(cd)
        p = self.prediction
        if p == "x0":
            res = x0c
        elif p == "eps":
            res = epsc
        elif p == "velocity":
            res = epsc - x0c
        else:  # "v"
            a, s = self.alpha_sigma(t, like=x0)
            res = a * epsc - s * x0c
        return res.to(out)

    def training_target(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """Regression target of the denoising loss for ``x_t = add_noise(x0, eps, t)``."""
        return self.x0_eps_to_pred(x0, eps, t)

    # ---- conversions --------------------------------------------------------------------------------------------
    def _clamp(self, d: Tensor) -> Tensor:
        # Divisors here are non-negative schedule values; clamp keeps the ill-posed end points finite.
        return d.clamp_min(self.min_divisor)

    def pred_to_x0_eps(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Both ``(x0, eps)`` implied by a prediction at ``(x_t, t)``, in the output dtype."""
        out, cd = self._dtype(pred, x_t)
        pc, xc = pred.to(cd), x_t.to(cd)
        a, s = self.alpha_sigma(t, like=x_t)
        p = self.prediction
        if p == "x0":
            x0 = pc
            eps = (xc - a * x0) / self._clamp(s)
        elif p == "eps":
            eps = pc
            x0 = (xc - s * eps) / self._clamp(a)
        elif p == "v":
            n = a * a + s * s  # == 1 on a variance-preserving path; kept for generality
            x0 = (a * xc - s * pc) / n
            eps = (s * xc + a * pc) / n
        else:  # "velocity"
            x0 = (xc - s * pc) / (a + s)  # a + s == 1 on the rectified-flow path
            eps = x0 + pc
        return x0.to(out), eps.to(out)

    def pred_to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Predicted clean data from a network prediction."""
        return self.pred_to_x0_eps(pred, x_t, t)[0]

    def pred_to_eps(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Predicted noise from a network prediction."""
        return self.pred_to_x0_eps(pred, x_t, t)[1]

    def x0_to_pred(self, x0: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Inverse of ``pred_to_x0`` at fixed ``(x_t, t)``: the prediction whose implied x0 is ``x0``.

        Lets a network trained in the teacher's parameterisation be supervised or guided in x0 space.
        """
        out, cd = self._dtype(x0, x_t)
        x0c, xc = x0.to(cd), x_t.to(cd)
        if self.prediction == "x0":
            return x0c.to(out)
        a, s = self.alpha_sigma(t, like=x_t)
        eps = (xc - a * x0c) / self._clamp(s)
        return self.x0_eps_to_pred(x0c, eps, t).to(out)

    def eps_to_pred(self, eps: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Inverse of ``pred_to_eps`` at fixed ``(x_t, t)``."""
        out, cd = self._dtype(eps, x_t)
        ec, xc = eps.to(cd), x_t.to(cd)
        a, s = self.alpha_sigma(t, like=x_t)
        x0 = (xc - s * ec) / self._clamp(a)
        return self.x0_eps_to_pred(x0, ec, t).to(out)

    def pred_to_velocity(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """Probability-flow ODE velocity ``d x_t / dt = alpha'(t) x0 + sigma'(t) eps`` (what Euler/Heun integrate)."""
        out, _ = self._dtype(pred, x_t)
        if self.prediction == "velocity":
            return pred.to(out)
        x0, eps = self.pred_to_x0_eps(pred, x_t, t)
        tt = bcast(torch.as_tensor(t, device=x_t.device).to(self.compute_dtype), x_t)
        da, ds = self._dalpha_dsigma_t(tt)
        return (da * x0.to(da.dtype) + ds * eps.to(da.dtype)).to(out)

    def score(self, pred: Tensor, x_t: Tensor, t: Tensor | float) -> Tensor:
        """``grad log p_t(x_t) = -eps / sigma`` (sigma clamped at ``min_divisor``)."""
        out, cd = self._dtype(pred, x_t)
        eps = self.pred_to_eps(pred, x_t, t).to(cd)
        _, s = self.alpha_sigma(t, like=x_t)
        return (-eps / self._clamp(s)).to(out)


class RectifiedFlow(NoisePath):
    """``x_t = (1 - t) x0 + t eps``. Default prediction ``velocity`` (``eps - x0``); ``x0`` and ``eps`` also work."""

    kind = "flow"
    predictions = ("velocity", "x0", "eps")

    def __init__(self, prediction: str = "velocity", dtype: torch.dtype = torch.float32, min_divisor: float = 1e-4):
        super().__init__(prediction, dtype, min_divisor)

    def _alpha_sigma_t(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1 - t, t

    def _dalpha_dsigma_t(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return -torch.ones_like(t), torch.ones_like(t)


def _ddpm_log_snr_table(num_steps: int, beta_start: float, beta_end: float) -> Tensor:
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)  # [N]
    return torch.log(abar) - torch.log1p(-abar)  # [N] log-SNR, decreasing


class VPPath(NoisePath):
    """Variance-preserving DDPM path: ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``.

    ``abar`` is the DDPM linear-beta schedule (``num_train_steps`` = 1000, beta 1e-4..0.02). Continuous ``t``
    maps to the fractional index ``t * (N - 1)``; log-SNR is linearly interpolated between neighbouring indices,
    so integer indices reproduce the discrete schedule exactly and ``alpha^2 + sigma^2 == 1`` everywhere.
    Predictions: ``eps`` (default), ``v`` (``alpha eps - sigma x0``), ``x0``.
    """

    kind = "vp"
    predictions = ("eps", "v", "x0")

    def __init__(self, prediction: str = "eps", dtype: torch.dtype = torch.float32, min_divisor: float = 1e-4,
                 num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__(prediction, dtype, min_divisor)
        self.num_train_steps = int(num_train_steps)
        self._log_snr_table = _ddpm_log_snr_table(self.num_train_steps, beta_start, beta_end)  # [N] float64
        self._tables: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def timestep_to_t(self, index: Tensor | int) -> Tensor:
        """Discrete DDPM index (0..N-1) to continuous ``t``."""
        return torch.as_tensor(index, dtype=torch.float64) / (self.num_train_steps - 1)

    def t_to_timestep(self, t: Tensor | float) -> Tensor:
        """Continuous ``t`` to the (fractional) DDPM index ``t * (N - 1)``."""
        return torch.as_tensor(t, dtype=torch.float64) * (self.num_train_steps - 1)

    def _interp(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Interpolated log-SNR and its derivative d(log-SNR)/dt at ``t`` (any shape)."""
        key = (t.device, t.dtype)
        table = self._tables.get(key)
        if table is None:  # one copy per device/dtype, not a host-to-device copy per call
            table = self._tables[key] = self._log_snr_table.to(device=t.device, dtype=t.dtype)  # [N]
        pos = t.clamp(0, 1) * (self.num_train_steps - 1)
        lo = pos.floor().long().clamp(0, self.num_train_steps - 2)
        frac = pos - lo.to(pos.dtype)
        l0, l1 = table[lo], table[lo + 1]
        return l0 + frac * (l1 - l0), (l1 - l0) * (self.num_train_steps - 1)

    def _alpha_sigma_t(self, t: Tensor) -> tuple[Tensor, Tensor]:
        lam, _ = self._interp(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def _dalpha_dsigma_t(self, t: Tensor) -> tuple[Tensor, Tensor]:
        lam, dlam = self._interp(t)
        a, s = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        # alpha^2 = sigmoid(lam): d alpha / d lam = alpha sigma^2 / 2, d sigma / d lam = -sigma alpha^2 / 2
        return 0.5 * a * s * s * dlam, -0.5 * s * a * a * dlam

    def abar(self, t: Tensor | float) -> Tensor:
        """Cumulative signal fraction ``alpha^2`` at ``t``."""
        a, _ = self.alpha_sigma(t)
        return a * a


PATH_KINDS = {"flow": RectifiedFlow, "rectified_flow": RectifiedFlow, "rf": RectifiedFlow,
              "vp": VPPath, "ddpm": VPPath}


def make_path(kind: str, prediction: str | None = None, dtype: torch.dtype = torch.float32,
              **kwargs) -> NoisePath:
    """Build a noise path by name: ``flow`` (aliases ``rectified_flow``, ``rf``) or ``vp`` (alias ``ddpm``).

    ``prediction`` defaults to the path's native type (``velocity`` for flow, ``eps`` for VP).
    """
    cls = PATH_KINDS.get(str(kind).lower())
    if cls is None:
        raise UserError(f"unknown noise path {kind!r}; use one of {sorted(PATH_KINDS)}")
    if prediction is None:
        prediction = cls.predictions[0]
    return cls(prediction=prediction, dtype=dtype, **kwargs)

