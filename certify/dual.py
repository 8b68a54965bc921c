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
as the intermediate bounds in the :class:`~certify.convex.Relaxation` are, in floating point too: the
Lagrangian's coefficients are sums of products, so each is within ``gamma_N`` times its absolute
version (the same sums over absolute values) of its exact value (Higham 2002, ch. 3; N bounds the
roundings along any chain of the sums); the box minimum, the L2 ball term (whatever its multiplier) and
the final sum add their own rounding, and the bound is lowered by all of it and by
:meth:`~certify.convex.Relaxation.margin_error` (the dense maps' folding error).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from .rounding import gamma

if TYPE_CHECKING:  # convex imports this module
    from .convex import DenseReLUNet, Relaxation

Duals = Mapping[str, Sequence[np.ndarray]]
_EPS = np.finfo(np.float64).eps
_U = _EPS / 2  # unit roundoff


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
                 duals: Duals | None) -> tuple[list[np.ndarray], float, list[np.ndarray], float]:
    """Objective minus the multiplied linear ReLU constraints, as per-block coefficients.

    Blocks are x, z_1 .. z_L. Families (each ``g(v) >= 0`` with multiplier >= 0, one array per
    layer): ``relu_lower`` z - s, ``triangle`` slope * s + intercept - z, ``pre_lower`` s - l,
    ``pre_upper`` u - s, where s = W z_prev + b. Returns (coefficients, constant, and their absolute
    versions: the same sums over absolute values, which scale their rounding errors).
    """
    coef = [np.zeros(net.input_dim)] + [np.zeros(n) for n in net.hidden]
    coef_abs = [np.zeros_like(v) for v in coef]
    const = float(c @ net.biases[-1])
    const_abs = float(np.abs(c) @ np.abs(net.biases[-1]))
    coef[-1] += net.weights[-1].T @ c
    coef_abs[-1] += np.abs(net.weights[-1]).T @ np.abs(c)
    for i, n in enumerate(net.hidden):
        lam_r, lam_t = _nonneg(duals, "relu_lower", i, n), _nonneg(duals, "triangle", i, n)
        lam_l, lam_u = _nonneg(duals, "pre_lower", i, n), _nonneg(duals, "pre_upper", i, n)
        coef[i + 1] += lam_t - lam_r
        coef_abs[i + 1] += lam_t + lam_r
        rho = lam_r - rel.slope[i] * lam_t - lam_l + lam_u  # multiplier of s
        rho_abs = lam_r + rel.slope[i] * lam_t + lam_l + lam_u  # slopes are >= 0
        coef[i] += net.weights[i].T @ rho
        coef_abs[i] += np.abs(net.weights[i]).T @ rho_abs
        const += float(rho @ net.biases[i] - lam_t @ rel.intercept[i] + lam_l @ rel.pre_lower[i]
                       - lam_u @ rel.pre_upper[i])
        const_abs += float(rho_abs @ np.abs(net.biases[i]) + lam_t @ np.abs(rel.intercept[i])
                           + lam_l @ np.abs(rel.pre_lower[i]) + lam_u @ np.abs(rel.pre_upper[i]))
    return coef, const, coef_abs, const_abs


def _box_min(coef: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """min over the box of coef^T v, lowered by its rounding error."""
    value = float(np.minimum(coef * lo, coef * hi).sum())
    return value - gamma(coef.size + 2, _U) * float(np.abs(coef) @ np.maximum(np.abs(lo), np.abs(hi)))


def _ball_min(coef: np.ndarray, rel: Relaxation) -> float:
    """A lower bound of min over x in box with ||x - x0|| <= eps of coef^T x: the dual function at the best
    multiplier mu found, each value lowered by its rounding error. At mu the minimiser over the box is
    ``x* = clip(x0 - coef / (2 mu))``; the computed x is within ``D = 3u (|x0| + |coef| / (2 mu))`` of it,
    which costs at most ``(|coef| + 2 mu |x - x0|) D + 3 mu D^2`` per coordinate (convexity), and the
    sum of the 2d + 1 terms at most gamma_{d+8} times their absolute values (mu eps^2 included, which
    is what keeps a large mu from winning by rounding)."""
    lo, hi, x0, r2 = rel.input_lower, rel.input_upper, rel.center, rel.radius ** 2
    g_sum = gamma(coef.size + 8, _U)

    def dual(mu: float) -> float:
        if mu <= 0:
            return _box_min(coef, lo, hi)
        x = np.clip(x0 - coef / (2 * mu), lo, hi)
        terms = coef * x + mu * (x - x0) ** 2
        drift = 3 * _U * (np.abs(x0) + np.abs(coef) / (2 * mu))
        moved = float(((np.abs(coef) + 2 * mu * np.abs(x - x0)) * drift + 3 * mu * drift ** 2).sum())
        rounding = g_sum * (float(np.abs(terms).sum() + 2 * mu * ((x - x0) ** 2).sum()) + 2 * mu * r2)
        return float(terms.sum() - mu * r2) - (moved + rounding) * (1 + g_sum)

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
    """Verified lower bound of c^T logits over the triangle relaxation, from any LP multipliers.

    With N = the widest layer + 4 per layer + 10 (the roundings along any chain of the Lagrangian's
    sums), the exact coefficients are within gamma_N times their absolute versions of the computed ones,
    which moves each block's minimum by at most that times the block's magnitudes."""
    coef, const, coef_abs, const_abs = linear_terms(net, rel, c, duals)
    g = gamma(max(net.input_dim, *net.hidden, net.num_classes) + 4 * len(net.weights) + 10, _U)
    boxes = [(rel.input_lower, rel.input_upper), *zip(rel.act_lower, rel.act_upper)]
    parts = [const]
    pad = g * const_abs
    for blk, (lo, hi) in enumerate(boxes):
        pad += g * float(coef_abs[blk] @ np.maximum(np.abs(lo), np.abs(hi)))
        parts.append(_ball_min(coef[0], rel) if blk == 0 and rel.center is not None else _box_min(coef[blk], lo, hi))
    total = float(sum(parts))
    pad = (pad + gamma(len(parts) + 2, _U) * sum(abs(p) for p in parts)) * (1 + g)
    return total - pad - rel.margin_error(c)


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
