"""Verified lower bounds from (possibly inaccurate) dual solutions of the LP and SDP relaxations.

Weak duality gives a lower bound of the relaxed minimum for *any* dual-feasible multipliers, so the
solver's multipliers are repaired, never trusted: inequality multipliers are clipped to >= 0, and
the Lagrangian is then minimised exactly in float64:

* LP (triangle relaxation): the Lagrangian is linear in the primal variables, minimised in closed
  form over the activation/input box (and, for an L2 ball, ``mu * (||x - x0||^2 - eps^2)`` added
  with the best ``mu >= 0`` found by a 1-D search of the concave dual function).
* SDP (Raghunathan, Steinhardt & Liang 2018, arXiv 1811.01057): the Lagrangian is ``<M, P>`` over
  ``P = [[1, v^T], [v, V]] >= 0``. With ``S = M - t E_00`` and the diagonal bounds ``P_kk <= r_k``
  that every feasible P satisfies, ``<M, P> >= t + min(0, lambda_min(D S D)) * sum_k r_k / d_k^2``
  for any t and positive diagonal scaling D: the dual PSD matrix shifted by its smallest
  eigenvalue. t is chosen by a 1-D search; the eigenvalue is computed in float64 and padded by
  its rounding error.

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


def _blocks(rel: Relaxation) -> tuple[np.ndarray, np.ndarray]:
    lo = np.concatenate([rel.input_lower, *rel.act_lower])
    hi = np.concatenate([rel.input_upper, *rel.act_upper])
    return lo, hi


def sdp_matrix(net: DenseReLUNet, rel: Relaxation, c: np.ndarray, duals: Duals | None) -> tuple[np.ndarray, float]:
    """The symmetric Lagrangian matrix M (1 + n, 1 + n) with L(P) = <M, P>, and a magnitude.

    Families beyond :func:`linear_terms`: ``box_lower``/``box_upper`` (v - l, u - v, per block),
    ``box_quad`` (-(v_k^2) + (l + u) v_k - l u >= 0), ``relu_eq`` (free: z_k^2 - z_k (W z_prev + b)_k
    = 0, as cvxpy reports equality multipliers: L = f + nu * h), ``ball`` (eps^2 - ||x - x0||^2 >= 0).
    """
    coef, const, mag = linear_terms(net, rel, c, duals)
    sizes = [net.input_dim, *net.hidden]
    offsets = np.concatenate([[1], 1 + np.cumsum(sizes)])
    n = int(offsets[-1])
    lin = np.concatenate(coef)
    quad = np.zeros(n)  # diagonal part of Q (index 1..n-1 used)
    M = np.zeros((n, n))
    lows = [rel.input_lower, *rel.act_lower]
    highs = [rel.input_upper, *rel.act_upper]
    for b, (lo, hi) in enumerate(zip(lows, highs)):
        sl = slice(offsets[b] - 1, offsets[b + 1] - 1)
        lam_lo, lam_hi = _nonneg(duals, "box_lower", b, sizes[b]), _nonneg(duals, "box_upper", b, sizes[b])
        eta = _nonneg(duals, "box_quad", b, sizes[b])
        lin[sl] += lam_hi - lam_lo - eta * (lo + hi)
        quad[offsets[b]:offsets[b + 1]] += eta
        terms = (lam_lo @ lo, -lam_hi @ hi, eta @ (lo * hi))
        const += sum(terms)
        mag += sum(abs(t) for t in terms)
    for i, k in enumerate(net.hidden):
        nu = _free(duals, "relu_eq", i, k)
        z, prev = slice(offsets[i + 1], offsets[i + 2]), slice(offsets[i], offsets[i + 1])
        quad[z] += nu
        cross = -(net.weights[i] * nu[:, None]) / 2  # (k, n_prev): entries of P[z, prev]
        M[z, prev] += cross
        M[prev, z] += cross.T
        lin[offsets[i + 1] - 1:offsets[i + 2] - 1] -= nu * net.biases[i]
    if rel.center is not None:
        mu = float(_nonneg(duals, "ball", 0, 1)[0])
        x = slice(1, offsets[1])
        quad[x] += mu
        lin[:net.input_dim] -= 2 * mu * rel.center
        const += -mu * rel.radius ** 2 + mu * float(rel.center @ rel.center)
        mag += mu * (rel.radius ** 2 + float(rel.center @ rel.center))
    M[np.arange(n), np.arange(n)] += quad
    M[0, 1:] += lin / 2
    M[1:, 0] += lin / 2
    M[0, 0] += const
    return M, mag


def _best_shift(A: np.ndarray, weight: np.ndarray) -> float:
    """max_t t + min(0, lambda_min(A - t E00)) * sum(weight), verified; weight[0] = 1."""
    total = float(weight.sum())
    a00, a, rest = A[0, 0], A[1:, 0], A[1:, 1:]
    lam, U = np.linalg.eigh(rest)
    w2 = (U.T @ a) ** 2
    lo = max(0.0, -lam[0]) if lam.size else 0.0

    def slope(delta: float) -> float:  # derivative of a00 + delta (1 - R) - a^T (rest + delta I)^-1 a
        return (1 - total) + float((w2 / (lam + delta) ** 2).sum())

    # g(delta) is concave on (lo, inf): bisection on its derivative
    left = lo + 1e-12 * (1 + abs(lo))
    right = max(2 * left, 1.0)
    while slope(right) > 0 and right < 1e12:
        right *= 4
    if slope(left) <= 0:
        right = left
    for _ in range(100):
        mid = (left + right) / 2
        left, right = (mid, right) if slope(mid) > 0 else (left, mid)
    delta = right
    t = a00 + delta - float((w2 / (lam + delta)).sum()) if lam.size else a00
    if not math.isfinite(t):
        return -math.inf
    S = A.copy()
    S[0, 0] -= t
    eig = float(np.linalg.eigvalsh(S)[0])
    err = 8 * S.shape[0] * _EPS * float(np.linalg.norm(S))
    return t + min(0.0, eig - err) * total


def sdp_bound(net: DenseReLUNet, rel: Relaxation, c: np.ndarray, duals: Duals | None) -> float:
    """Verified lower bound of c^T logits over the SDP relaxation, from any SDP multipliers."""
    M, mag = sdp_matrix(net, rel, c, duals)
    lo, hi = _blocks(rel)
    r = np.concatenate([[1.0], np.maximum(lo ** 2, hi ** 2)])
    keep = r > 0  # P_kk <= 0 forces the whole row of a PSD P to 0: those rows do not matter
    M, r = M[np.ix_(keep, keep)], r[keep]
    best = -math.inf
    for s in (np.ones_like(r), np.sqrt(r)):
        A = M * s[:, None] * s[None, :]  # D M D, D = diag(s)
        best = max(best, _best_shift(A, r / s ** 2))
    return best - 1e-12 * (1 + mag + float(np.abs(M).sum()) * float(r.sum()))


__all__ = ["interval_margin", "linear_terms", "lp_bound", "sdp_bound", "sdp_matrix"]
