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

_SQRT2 = math.sqrt(2.0)


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

    @cached_property
    def constraint_rows(self) -> sp.csr_matrix:
        """Rows of the equality and inequality constraints but P_00 = 1 (those that enter the Lagrangian)."""
        z, l = self.cone["z"], self.cone["l"]
        return self.A.tocsr()[1:z + l]

    def objective(self, c: np.ndarray) -> np.ndarray:
        """SCS's c for the margin ``c^T logits`` (c (K,))."""
        return svec_of_linear(c @ self.logits, self.n)

    def lagrangian(self, objective: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        """The Lagrangian matrix M ((n+1, n+1), L(P) = <M, P>) of SCS multipliers ``y`` and a bound on
        its rounding error (in |<M, P>| for every feasible P): inequality multipliers clipped to >= 0."""
        z, l = self.cone["z"], self.cone["l"]
        mult = np.nan_to_num(np.asarray(y[1:z + l], dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        mult[z - 1:] = np.maximum(mult[z - 1:], 0.0)
        rows = self.constraint_rows
        vec = objective + rows.T @ mult
        err = 4 * np.finfo(np.float64).eps * (np.abs(objective) + abs(rows).T @ np.abs(mult)) * (1 + rows.getnnz(0))
        return unsvec(vec, self.n + 1), float(err.sum()) * _SQRT2

    def verified_bound(self, c: np.ndarray, y: np.ndarray | None) -> float:
        """Verified lower bound of ``c^T logits`` over the relaxation from multipliers y (None: zeros)."""
        obj = self.objective(c)
        if y is None:
            y = np.zeros(self.A.shape[0])
        M, err = self.lagrangian(obj, y)
        return psd_box_bound(M) - err


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


def _normalised(m: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
    return sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ m


def lifted_size(rel: Relaxation) -> int:
    """Variables of the reduced relaxation: free input coordinates plus unstable neurons."""
    free = int((rel.input_upper > rel.input_lower).sum())
    return free + sum(int(((lo < 0) & (hi > 0)).sum()) for lo, hi in zip(rel.pre_lower, rel.pre_upper))


def build(net: DenseReLUNet, rel: Relaxation) -> ReducedSDP:
    """The reduced relaxation of one example (see the module docstring) as SCS data."""
    lo, hi = rel.input_lower, rel.input_upper
    free = np.flatnonzero(hi > lo)
    unstable = [np.flatnonzero((a < 0) & (b > 0)) for a, b in zip(rel.pre_lower, rel.pre_upper)]
    n = len(free) + sum(len(u) for u in unstable)
    dim = n + 1
    # the current layer's values as affine forms of [1; w]: (width, 1 + n)
    act = np.zeros((len(lo), dim))
    act[:, 0] = np.where(hi > lo, (lo + hi) / 2, lo)
    act[free, 1 + np.arange(len(free))] = (hi[free] - lo[free]) / 2
    pos = 1 + len(free)
    ones = np.ones((n, 1))
    linear: list[np.ndarray] = [np.hstack([ones, -np.eye(n)]), np.hstack([ones, np.eye(n)])]  # -1 <= w <= 1
    eq_rows: list[np.ndarray] = []
    inputs = act.copy()
    for i, (w, b) in enumerate(zip(net.weights[:-1], net.biases[:-1])):
        pre = w @ act
        pre[:, 0] += b
        lo_i, hi_i = rel.pre_lower[i], rel.pre_upper[i]
        lower = pre.copy()
        lower[:, 0] -= lo_i
        upper = -pre
        upper[:, 0] += hi_i
        linear += [lower, upper]
        nxt = np.where((lo_i >= 0)[:, None], pre, 0.0)  # active: z = s; inactive: z = 0
        for k in unstable[i]:
            half = hi_i[k] / 2
            zf = np.zeros(dim)
            zf[0], zf[pos] = half, half  # z = u/2 (1 + w) in [0, u]
            nxt[k] = zf
            triangle = rel.slope[i][k] * pre[k] - zf
            triangle[0] += rel.intercept[i][k]
            linear += [(zf - pre[k])[None], triangle[None]]  # z >= s and the triangle
            d = zf - pre[k]
            G = np.zeros((dim, dim))  # z (z - s) = 0 lifted: <sym(zf d^T), P> = 0
            G[0] += half * d
            G[pos] += half * d
            eq_rows.append(svec((G + G.T) / 2))
            pos += 1
        act = nxt
    logits = net.weights[-1] @ act
    logits[:, 0] += net.biases[-1]
    width = dim * (dim + 1) // 2
    forms = np.vstack(linear)  # (rows, 1 + n) affine forms >= 0: svec(sym(e_0 f^T)) lives in columns 0..n
    lin = sp.csr_matrix(np.hstack([forms[:, :1], forms[:, 1:] / _SQRT2]))
    lin.resize(lin.shape[0], width)
    k = np.arange(1, dim)
    diag = sp.csr_matrix((np.concatenate([np.ones(n), -np.ones(n)]),
                          (np.concatenate([np.arange(n), np.arange(n)]),
                           np.concatenate([np.zeros(n, dtype=int), svec_index(k, k, dim)]))), shape=(n, width))
    ineq = [lin, diag]
    if rel.center is not None:
        offset = inputs.copy()  # x - x0 as affine forms of [1; w]
        offset[:, 0] -= rel.center
        G = -offset.T @ offset  # eps^2 - ||x - x0||^2 >= 0
        G[0, 0] += rel.radius ** 2
        ineq.append(sp.csr_matrix(svec(G)[None, :]))
    p00 = sp.csr_matrix(([1.0], ([0], [0])), shape=(1, width))
    eqs = _normalised(_sparse_rows(eq_rows, width))
    ineqs = _normalised(sp.vstack(ineq).tocsr())
    # SCS: b - A x in cone; equalities <G, P> = 0, inequalities <G, P> >= 0 (A = -svec(G)), P in PSD
    A = sp.vstack([p00, eqs, -ineqs, -sp.identity(width)]).tocsc()
    b = np.zeros(A.shape[0])
    b[0] = 1.0
    cone = {"z": 1 + eqs.shape[0], "l": ineqs.shape[0], "s": [dim]}
    return ReducedSDP(n, logits, A, b, cone, [len(u) for u in unstable])


__all__ = ["ReducedSDP", "build", "lifted_size", "svec", "svec_index", "unsvec"]
