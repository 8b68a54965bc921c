"""Verified lower bounds from (possibly inaccurate) dual solutions of the LP and SDP relaxations.

Weak duality gives a lower bound of the relaxed minimum for *any* dual-feasible multipliers, so the
solver's multipliers are repaired, never trusted: inequality multipliers are clipped to >= 0, and
the Lagrangian is then minimised exactly in float64:

* LP (triangle relaxation): the Lagrangian is linear in the primal variables, minimised in closed
  form over the activation/input box (and, for an L2 ball, ``mu * (||x - x0||^2 - eps^2)`` added
  with the best ``mu >= 0`` found by a 1-D search of the concave dual function).
* SDP (Raghunathan, Steinhardt & Liang 2018, arXiv 1811.01057), in the normalised coordinates of
  :mod:`certify.sdp_problem`: the Lagrangian is ``<M, P>`` over ``P = [[1, w^T], [w, W]] >= 0`` with
  ``-1 <= w <= 1`` and ``W_kk <= 1``. Only the PSD block ``M[1:, 1:]`` is shifted (by a diagonal
  from its smallest eigenvalue, computed in float64 and padded by its rounding error); the linear
  part is then minimised exactly over the box (:func:`psd_box_bound`), so a solver's small dual
  infeasibility in the linear constraints costs nothing beyond what it changes in the minimum.

Every function returns a bound of ``c^T logits`` valid for every input of the threat set, as long
as the intermediate bounds in the :class:`~certify.convex.Relaxation` are.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # convex imports this module
    from .convex import DenseReLUNet, Relaxation

Duals = Mapping[str, Sequence[np.ndarray]]
_EPS = np.finfo(np.float64).eps


def _nonneg(duals: Duals | None, name: str, i: int, n: int) -> np.ndarray:
    if duals is None or name not in duals or duals[name][i] is None:
        return np.zeros(n)
    v = np.nan_to_num(np.asarray(duals[name][i], dtype=np.float64).reshape(n), nan=0.0, posinf=0.0, neginf=0.0)
    return np.maximum(v, 0.0)


def _free(duals: Duals | None, name: str, i: int, n: int) -> np.ndarray:
    if duals is None or name not in duals or duals[name][i] is None:
        return np.zeros(n)
    v = np.asarray(duals[name][i], dtype=np.float64).reshape(n)
    return np.where(np.isfinite(v), v, 0.0)


def linear_terms(net: DenseReLUNet, rel: Relaxation, c: np.ndarray,
                 duals: Duals | None) -> tuple[list[np.ndarray], float, float]:
    """Objective minus the multiplied linear ReLU constraints, as per-block coefficients.

    Blocks are x, z_1 .. z_L. Families (each ``g(v) >= 0`` with multiplier >= 0, one array per
    layer): ``relu_lower`` z - s, ``triangle`` slope * s + intercept - z, ``pre_lower`` s - l,
    ``pre_upper`` u - s, where s = W z_prev + b. Returns (coefficients, constant, magnitude) with
    magnitude a scale for rounding-error padding.
    """
    coef = [np.zeros(net.input_dim)] + [np.zeros(n) for n in net.hidden]
    const = float(c @ net.biases[-1])
    coef[-1] += net.weights[-1].T @ c
    mag = abs(const)
    for i, n in enumerate(net.hidden):
        lam_r, lam_t = _nonneg(duals, "relu_lower", i, n), _nonneg(duals, "triangle", i, n)
        lam_l, lam_u = _nonneg(duals, "pre_lower", i, n), _nonneg(duals, "pre_upper", i, n)
        coef[i + 1] += lam_t - lam_r
        rho = lam_r - rel.slope[i] * lam_t - lam_l + lam_u  # multiplier of s
        coef[i] += net.weights[i].T @ rho
        terms = (rho @ net.biases[i], -lam_t @ rel.intercept[i], lam_l @ rel.pre_lower[i], -lam_u @ rel.pre_upper[i])
        const += sum(terms)
        mag += sum(abs(t) for t in terms)
    return coef, const, mag


def _box_min(coef: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    return float(np.minimum(coef * lo, coef * hi).sum())


def _ball_min(coef: np.ndarray, rel: Relaxation) -> float:
    """min over x in box with ||x - x0|| <= eps of coef^T x, via the best multiplier of the ball."""
    lo, hi, x0, r2 = rel.input_lower, rel.input_upper, rel.center, rel.radius ** 2

    def dual(mu: float) -> float:
        if mu <= 0:
            return _box_min(coef, lo, hi)
        x = np.clip(x0 - coef / (2 * mu), lo, hi)
        return float((coef * x + mu * (x - x0) ** 2).sum() - mu * r2)

    # the dual function is concave in mu, hence unimodal in log(mu): golden-section search
    a, b = -12.0, 12.0
    g = (math.sqrt(5) - 1) / 2
    p, q = b - g * (b - a), a + g * (b - a)
    fp, fq = dual(10 ** p), dual(10 ** q)
    for _ in range(60):
        if fp < fq:
            a, p, fp = p, q, fq
            q = a + g * (b - a)
            fq = dual(10 ** q)
        else:
            b, q, fq = q, p, fp
            p = b - g * (b - a)
            fp = dual(10 ** p)
    return max(dual(0.0), fp, fq)


def lp_bound(net: DenseReLUNet, rel: Relaxation, c: np.ndarray, duals: Duals | None) -> float:
    """Verified lower bound of c^T logits over the triangle relaxation, from any LP multipliers."""
    coef, const, mag = linear_terms(net, rel, c, duals)
    total = const
    for blk, (lo, hi) in enumerate(zip(rel.act_lower, rel.act_upper), start=1):
        total += _box_min(coef[blk], lo, hi)
    if rel.center is None:
        total += _box_min(coef[0], rel.input_lower, rel.input_upper)
    else:
        total += _ball_min(coef[0], rel)
    scale = mag + sum(float(np.abs(cf).sum()) for cf in coef) * (1 + max(float(np.abs(rel.input_upper).max()), 1.0))
    return total - 1e-12 * (1 + scale)


def interval_margin(net: DenseReLUNet, rel: Relaxation, c: np.ndarray) -> float:
    """c^T logits bounded over the last layer's activation box alone (no multipliers)."""
    return lp_bound(net, rel, c, None)


def psd_box_bound(M: np.ndarray) -> float:
    """Verified lower bound of min <M, P> over P = [[1, w^T], [w, W]] >= 0, -1 <= w <= 1, W_kk <= 1.

    For a diagonal D >= 0 with R + D >= 0 (R = M[1:, 1:]; checked by lambda_min in float64, padded by
    its rounding error), W >= w w^T and W_kk <= 1 give <M, P> >= q(w) = M_00 + 2 M_0:^T w +
    w^T (R + D) w - trace(D). q is convex, so its minimum over the box is at least
    q(w*) + min_box grad q(w*)^T (w - w*) for any w*: the linear part is handled exactly over the box
    and only the PSD part is shifted. Two shifts are tried, the best bound kept: D = mu I, and
    D = mu diag(d) with d the diagonal of R's negative part (a defect confined to a few coordinates
    then costs only there).
    """
    M = np.asarray(M, dtype=np.float64)
    if not np.isfinite(M).all():
        return -math.inf
    n = M.shape[0] - 1
    if n == 0:
        return float(M[0, 0])
    R = (M[1:, 1:] + M[1:, 1:].T) / 2
    lam, U = np.linalg.eigh(R)
    negative = np.maximum(-lam, 0.0)
    scales = [np.ones(n)]
    if negative.any():
        scales.append(np.sqrt((U ** 2) @ negative + 1e-9 * float(negative.max())))
    best = -math.inf
    for d in scales:
        mu = max(0.0, -float(np.linalg.eigvalsh(R / d[:, None] / d[None, :])[0]))
        best = max(best, _shifted_box_bound(M, R, mu * d ** 2))
    return best


def _shifted_box_bound(M: np.ndarray, R: np.ndarray, shift: np.ndarray) -> float:
    """The bound of :func:`psd_box_bound` for one diagonal shift (made PSD-safe first)."""
    n = len(shift)
    Q = R + np.diag(shift)
    err = 8 * n * _EPS * (float(np.linalg.norm(Q)) + 1e-300)
    extra = max(0.0, err - float(np.linalg.eigvalsh(Q)[0]))
    Q[np.diag_indices(n)] += extra
    trace = float(shift.sum()) + extra * n
    m00, m = float(M[0, 0]), M[0, 1:]
    w = _box_qp(Q, m)
    grad = 2 * (m + Q @ w)
    value = m00 + 2 * float(m @ w) + float(w @ Q @ w) - trace
    bound = value - float(grad @ w) - float(np.abs(grad).sum())
    pad = 16 * (n + 1) * _EPS * (abs(m00) + 2 * float(np.abs(m).sum()) + float(np.abs(Q).sum()) + trace
                                 + float(np.abs(grad).sum()))
    return bound - pad


def _box_qp(Q: np.ndarray, m: np.ndarray, iters: int = 300) -> np.ndarray:
    """Approximate minimiser of 2 m^T w + w^T Q w over [-1, 1]^n (Q >= 0): accelerated projected
    gradient (FISTA); only its accuracy, never the bound's soundness, depends on it."""
    step = 1.0 / (2 * max(float(np.linalg.norm(Q, 2)), 1e-12))
    w = prev = np.clip(-np.linalg.lstsq(Q, m, rcond=None)[0], -1, 1) if m.size else m.copy()
    t = 1.0
    for _ in range(iters):
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        v = w + (t - 1) / t_next * (w - prev)
        prev, w = w, np.clip(v - step * 2 * (m + Q @ v), -1, 1)
        t = t_next
    return w


__all__ = ["interval_margin", "linear_terms", "lp_bound", "psd_box_bound"]
