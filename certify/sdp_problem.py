"""The SDP relaxation of one example (Raghunathan, Steinhardt & Liang 2018, arXiv 1811.01057, with the
triangle cuts) in reduced, normalised coordinates, written directly as SCS data.

Reduction (exact, given the intermediate bounds): a neuron whose pre-activation bounds are stable is
an affine function of the previous layer (active: ``z = s``; inactive: ``z = 0``), so it is
substituted, not lifted; an input coordinate whose interval is a point is a constant. The variables
are the free inputs and the unstable neurons only, each normalised to ``w in [-1, 1]`` by
``v = mid + half * w``, and every pre-activation ``s_i = G_i [1; w]`` is an affine form of them.
The lifted matrix is ``P = [[1, w^T], [w, W]] >= 0`` (W relaxes w w^T) with::

    P_00 = 1,  -1 <= w <= 1,  W_kk <= 1                      (box and its quadratic form, all variables)
    l <= s <= u                                               (every neuron, stable ones included)
    z >= s,  z <= slope * s + intercept,  z (z - s) = 0        (unstable neurons: triangle + ReLU equality)
    ||x - x0||^2 <= eps^2                                     (L2 ball only)

Every constraint of the triangle LP holds in this form, so its optimum is never below the LP's with the
same intermediate bounds, and substituting stable neurons only removes freedom the relaxation of the
full network had (never a true point). Every constraint is ``<G, P> >= 0`` or ``= 0``; rows of A are
``svec(G)`` normalised to unit norm. The verified bound is :func:`certify.dual.psd_box_bound` of the
Lagrangian ``unsvec(c + A^T y)`` built from SCS's multipliers ``y``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from .convex import DenseReLUNet, Relaxation
from .dual import psd_box_bound
from .rounding import gamma

_SQRT2 = math.sqrt(2.0)
_U = 2.0 ** -53


@dataclass
class ReducedSDP:
    """SCS data of one example's relaxation; the objective (a margin) is set per class.

    ``n``: variables (free inputs + unstable neurons); ``logits`` (K, 1 + n): every logit as an affine
    form of ``[1; w]``; ``A`` (rows, N) with N = (n + 1)(n + 2) / 2, ``b``, ``cone``: SCS data whose
    first ``zero`` rows are equalities (row 0: P_00 = 1) and the next ``nonneg`` rows inequalities.
    """

    n: int
    logits: np.ndarray
    A: sp.csc_matrix
    b: np.ndarray
    cone: dict
    unstable: list[int]
    #: (K, 1 + n) bounds on the rounding error of ``logits``; (rows,) bounds on the 1-norm of the rounding
    #: error of each constraint row of :attr:`constraint_rows` (0 for exact data)
    logits_error: np.ndarray | None = None
    row_errors: np.ndarray | None = None

    @cached_property
    def constraint_rows(self) -> sp.csr_matrix:
        """Rows of the equality and inequality constraints but P_00 = 1 (those that enter the Lagrangian)."""
        z, l = self.cone["z"], self.cone["l"]
        return self.A.tocsr()[1:z + l]

    def objective(self, c: np.ndarray) -> np.ndarray:
        """SCS's c for the margin ``c^T logits`` (c (K,))."""
        return svec_of_linear(c @ self.logits, self.n)

    def multipliers(self, y: np.ndarray) -> np.ndarray:
        """SCS's multipliers of :attr:`constraint_rows`, non-finite ones 0, inequality ones clipped to >= 0."""
        z, l = self.cone["z"], self.cone["l"]
        mult = np.nan_to_num(np.asarray(y[1:z + l], dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        mult[z - 1:] = np.maximum(mult[z - 1:], 0.0)
        return mult

    def lagrangian(self, objective: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        """The Lagrangian matrix M ((n+1, n+1), L(P) = <M, P>) of SCS multipliers ``y`` and a bound on
        its rounding error (in |<M, P>| for every feasible P): inequality multipliers clipped to >= 0."""
        mult = self.multipliers(y)
        rows = self.constraint_rows
        vec = objective + rows.T @ mult
        err = 4 * np.finfo(np.float64).eps * (np.abs(objective) + abs(rows).T @ np.abs(mult)) * (1 + rows.getnnz(0))
        return unsvec(vec, self.n + 1), float(err.sum()) * _SQRT2

    def verified_bound(self, c: np.ndarray, y: np.ndarray | None) -> float:
        """Verified lower bound of ``c^T logits`` over the relaxation from multipliers y (None: zeros).

        The data were rounded: for a true point P (entries in [-1, 1], so |svec(P)| <= sqrt 2) each
        constraint's value moves by at most sqrt 2 times its row's error, weighted by |multiplier|, and
        the objective by sqrt 2 times its own error."""
        obj = self.objective(c)
        if y is None:
            y = np.zeros(self.A.shape[0])
        M, err = self.lagrangian(obj, y)
        data = 0.0
        if self.row_errors is not None:
            data += float(np.abs(self.multipliers(y)) @ self.row_errors)
        if self.logits_error is not None:
            form = np.abs(c @ self.logits)
            form_err = np.abs(c) @ self.logits_error + _U * form
            data += float(form_err[0] + ((form_err[1:] + _U * form[1:]) / _SQRT2).sum() * (1 + _U))
        return psd_box_bound(M) - err - _SQRT2 * data * (1 + 1e-12)


def _index(dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of the lower triangle of a dim x dim matrix in SCS's order (column-major)."""
    col, row = np.triu_indices(dim)
    return row, col


def svec_index(i: np.ndarray | int, j: np.ndarray | int, dim: int) -> np.ndarray:
    """Position of entry (i, j), i >= j, in SCS's svec of a dim x dim matrix."""
    i, j = np.maximum(i, j), np.minimum(i, j)
    return j * dim - j * (j - 1) // 2 + (i - j)


def svec(G: np.ndarray) -> np.ndarray:
    """SCS's svec of a symmetric matrix: lower triangle, column-major, off-diagonal times sqrt(2)."""
    r, c = _index(G.shape[0])
    return G[r, c] * np.where(r == c, 1.0, _SQRT2)


def unsvec(v: np.ndarray, dim: int) -> np.ndarray:
    r, c = _index(dim)
    M = np.zeros((dim, dim))
    vals = v * np.where(r == c, 1.0, 1.0 / _SQRT2)
    M[r, c] = vals
    M[c, r] = vals
    return M


def svec_of_linear(form: np.ndarray, n: int) -> np.ndarray:
    """svec of sym(e_0 form^T): <., P> = form_0 + form[1:] . w."""
    out = np.zeros((n + 1) * (n + 2) // 2)
    out[0] = form[0]
    out[1:n + 1] = form[1:] / _SQRT2
    return out


def _sparse_rows(rows: list[np.ndarray], width: int) -> sp.csr_matrix:
    if not rows:
        return sp.csr_matrix((0, width))
    return sp.csr_matrix(np.vstack(rows))


def _normalised(m: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    """Rows scaled to unit norm, and the scale of each row."""
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    scale = 1.0 / np.where(norms > 0, norms, 1.0)
    return sp.diags(scale) @ m, scale


def lifted_size(rel: Relaxation) -> int:
    """Variables of the reduced relaxation: free input coordinates plus unstable neurons."""
    free = int((rel.input_upper > rel.input_lower).sum())
    return free + sum(int(((lo < 0) & (hi > 0)).sum()) for lo, hi in zip(rel.pre_lower, rel.pre_upper))


def build(net: DenseReLUNet, rel: Relaxation) -> ReducedSDP:
    """The reduced relaxation of one example (see the module docstring) as SCS data.

    Every affine form is built together with an elementwise bound on its rounding error (``*_err``:
    gamma of its sums times the same sums over absolute values, plus the earlier forms' errors carried
    through |W|), so that each constraint row and the logits know how far they are from the exact ones.
    """
    lo, hi = rel.input_lower, rel.input_upper
    free = np.flatnonzero(hi > lo)
    unstable = [np.flatnonzero((a < 0) & (b > 0)) for a, b in zip(rel.pre_lower, rel.pre_upper)]
    n = len(free) + sum(len(u) for u in unstable)
    dim = n + 1
    # the current layer's values as affine forms of [1; w]: (width, 1 + n); x = mid + half w, with half
    # rounded up so that w in [-1, 1] covers [lo, hi] (the forms are then exact by definition)
    act = np.zeros((len(lo), dim))
    mid = (lo + hi) / 2
    act[:, 0] = np.where(hi > lo, mid, lo)
    act[free, 1 + np.arange(len(free))] = ((hi - lo) / 2 + 2 * _U * (np.abs(mid) + np.abs(hi - lo)))[free]
    act_err = np.zeros_like(act)
    pos = 1 + len(free)
    ones = np.ones((n, 1))
    linear: list[np.ndarray] = [np.hstack([ones, -np.eye(n)]), np.hstack([ones, np.eye(n)])]  # -1 <= w <= 1
    linear_err: list[np.ndarray] = [np.zeros((n, dim)), np.zeros((n, dim))]
    eq_rows: list[np.ndarray] = []
    eq_err: list[np.ndarray] = []
    inputs = act.copy()
    for i, (w, b) in enumerate(zip(net.weights[:-1], net.biases[:-1])):
        pre, pre_err = _affine_forms(w, b, act, act_err)
        lo_i, hi_i = rel.pre_lower[i], rel.pre_upper[i]
        lower = pre.copy()
        lower[:, 0] -= lo_i
        upper = -pre
        upper[:, 0] += hi_i
        linear += [lower, upper]
        linear_err += [pre_err + _col0(_U * np.abs(lower[:, 0]), dim), pre_err + _col0(_U * np.abs(upper[:, 0]), dim)]
        active = (lo_i >= 0)[:, None]
        nxt, nxt_err = np.where(active, pre, 0.0), np.where(active, pre_err, 0.0)  # active: z = s; inactive: 0
        for k in unstable[i]:
            half = hi_i[k] / 2
            zf = np.zeros(dim)
            zf[0], zf[pos] = half, half  # z = u/2 (1 + w) in [0, u], exact
            nxt[k], nxt_err[k] = zf, 0.0
            d = zf - pre[k]
            d_err = pre_err[k] + _U * np.abs(d)
            triangle = rel.slope[i][k] * pre[k] - zf
            triangle[0] += rel.intercept[i][k]
            tri_err = rel.slope[i][k] * pre_err[k] + 3 * _U * (np.abs(rel.slope[i][k] * pre[k]) + np.abs(zf)
                                                              + _col0(abs(rel.intercept[i][k]), dim)[0])
            linear += [d[None], triangle[None]]  # z >= s and the triangle
            linear_err += [d_err[None], tri_err[None]]
            G = np.zeros((dim, dim))  # z (z - s) = 0 lifted: <sym(zf d^T), P> = 0
            G[0] += half * d
            G[pos] += half * d
            G_err = np.zeros((dim, dim))
            G_err[0] += half * d_err + _U * np.abs(half * d)
            G_err[pos] += half * d_err + _U * np.abs(half * d)
            S = (G + G.T) / 2
            eq_rows.append(svec(S))
            eq_err.append(svec((G_err + G_err.T) / 2 + _U * np.abs(S)) * (1 + _U) + _U * np.abs(svec(S)))
            pos += 1
        act, act_err = nxt, nxt_err
    logits, logits_err = _affine_forms(net.weights[-1], net.biases[-1], act, act_err)
    width = dim * (dim + 1) // 2
    forms = np.vstack(linear)  # (rows, 1 + n) affine forms >= 0: svec(sym(e_0 f^T)) lives in columns 0..n
    forms_err = np.vstack(linear_err)
    lin = sp.csr_matrix(np.hstack([forms[:, :1], forms[:, 1:] / _SQRT2]))
    lin.resize(lin.shape[0], width)
    lin_err = np.hstack([forms_err[:, :1], forms_err[:, 1:] / _SQRT2 * (1 + _U) + _U * np.abs(forms[:, 1:] / _SQRT2)])
    k = np.arange(1, dim)
    diag = sp.csr_matrix((np.concatenate([np.ones(n), -np.ones(n)]),
                          (np.concatenate([np.arange(n), np.arange(n)]),
                           np.concatenate([np.zeros(n, dtype=int), svec_index(k, k, dim)]))), shape=(n, width))
    ineq = [lin, diag]
    ineq_err = [lin_err.sum(1), np.zeros(n)]  # 1-norm of each row's error
    if rel.center is not None:
        offset = inputs.copy()  # x - x0 as affine forms of [1; w]
        offset[:, 0] -= rel.center
        offset_err = _col0(_U * np.abs(offset[:, 0]), dim)
        G = -offset.T @ offset  # eps^2 - ||x - x0||^2 >= 0
        G[0, 0] += rel.radius ** 2
        G_err = (gamma(len(offset) + 4, _U) * (np.abs(offset).T @ np.abs(offset)) + 2 * np.abs(offset).T @ offset_err
                 + offset_err.T @ offset_err)
        G_err[0, 0] += 3 * _U * (rel.radius ** 2 + abs(G[0, 0]))
        ineq.append(sp.csr_matrix(svec(G)[None, :]))
        ineq_err.append(np.array([(svec(G_err) * (1 + _U) + _U * np.abs(svec(G))).sum()]))
    p00 = sp.csr_matrix(([1.0], ([0], [0])), shape=(1, width))
    eqs, eq_scale = _normalised(_sparse_rows(eq_rows, width))
    ineqs, ineq_scale = _normalised(sp.vstack(ineq).tocsr())
    eq_row_err = np.array([e.sum() for e in eq_err]) if eq_err else np.zeros(0)
    # scaling a row by a positive number keeps its constraint; the product's rounding does not
    row_errors = np.concatenate([eq_row_err * eq_scale * (1 + _U) + _U * np.asarray(abs(eqs).sum(1)).ravel(),
                                 np.concatenate(ineq_err) * ineq_scale * (1 + _U)
                                 + _U * np.asarray(abs(ineqs).sum(1)).ravel()])
    # SCS: b - A x in cone; equalities <G, P> = 0, inequalities <G, P> >= 0 (A = -svec(G)), P in PSD
    A = sp.vstack([p00, eqs, -ineqs, -sp.identity(width)]).tocsc()
    b = np.zeros(A.shape[0])
    b[0] = 1.0
    cone = {"z": 1 + eqs.shape[0], "l": ineqs.shape[0], "s": [dim]}
    return ReducedSDP(n, logits, A, b, cone, [len(u) for u in unstable], logits_err, row_errors)


def _col0(v: np.ndarray | float, dim: int) -> np.ndarray:
    """Values v placed in column 0 of (len(v), dim) forms (one form for a scalar)."""
    v = np.atleast_1d(np.asarray(v, dtype=np.float64))
    out = np.zeros((len(v), dim))
    out[:, 0] = v
    return out


def _affine_forms(w: np.ndarray, b: np.ndarray, act: np.ndarray, act_err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w @ act`` plus b in column 0, and its error bound: the products' rounding (gamma of the sum length
    times the same sums over absolute values) plus the forms' own errors carried through |w|."""
    out = w @ act
    out[:, 0] += b
    g = gamma(w.shape[1] + 2, _U)
    err = g * (np.abs(w) @ np.abs(act) + _col0(np.abs(b), act.shape[1])) + np.abs(w) @ act_err
    return out, err * (1 + g)


__all__ = ["ReducedSDP", "build", "lifted_size", "svec", "svec_index", "unsvec"]
