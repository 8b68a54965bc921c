"""Smallest eigenvalues for the first-order SDP (Dathathri et al. 2020, arXiv 2010.11645).

* :func:`lanczos_min`: batched Lanczos with full reorthogonalisation and an explicit Rayleigh-Ritz step
  (``T = Q^T A Q`` from the stored products), matrix-free, warm-started from the previous step's vector.
  Its value is a Ritz value: an UPPER estimate of the smallest eigenvalue, used only to steer optimisation.
* :func:`best_diagonal`: for a fixed dense matrix A, the diagonal ``K = diag(kappa_0, kappa)``, ``kappa >= 0``,
  of least trace with ``A + K`` (nearly) PSD: the dual of ``min <A, P>`` over ``P >= 0, P_00 = 1, P_kk <= 1``,
  solved by the mixing method (Wang, Chang & Kolter 2017, arXiv 1710.05080: block coordinate descent on
  a rank-r factor ``P = V V^T`` with ``r > sqrt(2 n)``, Burer & Monteiro), K read off its KKT conditions.
  Coordinates in one block must not be coupled (A's block is diagonal): a block is then updated exactly.
* :func:`min_eigenvalue_lower`: a PROVEN lower bound of the smallest eigenvalue of a dense float64
  matrix (lower triangle stored): a float64 Lanczos estimate ``theta`` (residual ``r``), then Cholesky of
  ``A - sigma I`` at ``sigma = min(0, theta - 2 ||r||)`` minus a margin; a successful floating-point
  Cholesky proves ``lambda_min(A) >= sigma - alpha`` with ``alpha = gamma_{n+1} / (1 - gamma_{n+1}) tr(A - sigma I)``
  (Demmel 1989; Rump 2006, "Verification of positive definiteness", BIT 46). When Cholesky fails (a
  smaller eigenvalue Lanczos missed) the full ``eigvalsh`` decides, padded by ``8 n u ||A||_F``, the rule of
  :func:`certify.dual.psd_box_bound`.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import scipy.linalg as sla
import torch
from scipy.linalg import blas, lapack
from torch import Tensor

from .rounding import gamma, unit_roundoff

U64 = float(unit_roundoff(torch.float64))


def _orthogonalise(w: Tensor, basis: list[Tensor]) -> Tensor:
    """Columns of w (B, p, D) made orthonormal to the ``basis`` blocks and to each other, inside their span
    (so zero coordinates stay zero): projected out twice, then ``W U diag(lambda)^-1/2`` from the Gram
    matrix's eigendecomposition, twice; directions of the span that vanish are dropped (zero columns)."""
    q = torch.cat(basis, 1) if basis else None
    # pass 1 drops what is exactly dependent (below ten roundings of the block's largest norm); pass 2 sees
    # unit vectors: one that lost most of its length to the basis was rounding noise amplified by pass 1,
    # and kept it would not be orthogonal to the basis (Rayleigh-Ritz would then be invalid)
    eps = torch.finfo(w.dtype).eps
    tol = (10 * eps) ** 2 * w.pow(2).sum(2).amax(1, keepdim=True).clamp(min=1e-30)
    for _ in range(2):
        if q is not None:
            w = w - torch.bmm(torch.bmm(w, q.transpose(1, 2)), q)
        gram = torch.bmm(w, w.transpose(1, 2))
        vals, vecs = torch.linalg.eigh((gram + gram.transpose(1, 2)) / 2)
        keep = vals > tol
        tol = torch.full_like(tol, 0.01)
        scale = torch.where(keep, vals.clamp(min=1e-30).rsqrt(), torch.zeros_like(vals))
        w = torch.bmm((vecs * scale[:, None, :]).transpose(1, 2), w)
    return w


def lanczos_min(matvec: Callable[[Tensor], Tensor], start: Tensor, mask: Tensor, steps: int,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Ritz estimates of the p smallest eigenvalues of B symmetric operators restricted to ``mask``.

    Block Lanczos with full reorthogonalisation and an explicit Rayleigh-Ritz step (``T = Q^T A Q`` from
    the stored products): ``start`` (B, p, D) is the warm start (the previous Ritz vectors; zero rows start
    at random), ``matvec`` maps (B * p, D) -> (B * p, D) (row b * p + j is vector j of operator b), ``mask``
    (B, D) the coordinates each operator acts on; ``steps`` block steps after the start block. Returns
    (theta (B, p) ascending, unit Ritz vectors (B, p, D)); theta_i >= lambda_i up to rounding (Cauchy
    interlacing): an estimate, never a bound by itself.
    """
    b, p, d = start.shape
    mask3 = mask[:, None, :]
    noise = torch.randn(start.shape, generator=generator, dtype=start.dtype) * mask3
    x = torch.where((start * mask3).norm(dim=2, keepdim=True) > 0, start * mask3, noise)
    basis: list[Tensor] = []
    images: list[Tensor] = []
    block = _orthogonalise(x, basis)
    for step in range(steps + 1):
        basis.append(block)
        images.append(matvec(block.reshape(b * p, d)).reshape(b, p, d) * mask3)
        if step < steps:
            block = _orthogonalise(images[-1], basis)
    q, aq = torch.cat(basis, 1), torch.cat(images, 1)
    t = torch.einsum("bid,bjd->bij", q, aq)
    t = (t + t.transpose(1, 2)) / 2
    off = q.norm(dim=2) < 0.5  # columns left zero: given eigenvalues above the spectrum (not 1e30: rounding)
    t = t.masked_fill(off[:, :, None] | off[:, None, :], 0.0)
    above = 4 * t.abs().sum(2).amax(1) + 1
    t = t + torch.diag_embed(off.to(t.dtype) * above[:, None])
    vals, vecs = torch.linalg.eigh(t)
    y = vecs[:, :, :p]  # (B, k, p)
    return vals[:, :p], torch.einsum("bkp,bkd->bpd", y, q)


def _symv(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    # a C-ordered matrix is its transpose in Fortran order: its lower triangle is that one's upper (no copy)
    return blas.dsymv(1.0, a.T, v, lower=0)


def dense_lanczos(a: np.ndarray, start: np.ndarray, iters: int = 40, seed: int = 0) -> tuple[float, float]:
    """(Ritz value, residual norm) of the smallest eigenvalue of ``a`` (float64, lower triangle), float64.
    ``start`` (n,) or (n, r): a block start is first reduced to its best vector (Rayleigh-Ritz on its span)."""
    n = a.shape[0]
    k = min(iters, n)
    rng = np.random.default_rng(seed)
    q = np.asarray(start, dtype=np.float64)
    if q.ndim == 2 and np.isfinite(q).all():
        basis, _ = np.linalg.qr(q)
        image = blas.dsymm(1.0, a.T, basis, side=0, lower=0)
        t = basis.T @ image
        q = basis @ np.linalg.eigh((t + t.T) / 2)[1][:, 0]
    if q.ndim != 1 or not np.isfinite(q).all() or np.linalg.norm(q) == 0:
        q = rng.standard_normal(n)
    q = q / np.linalg.norm(q)
    basis, images = np.zeros((k, n)), np.zeros((k, n))
    for j in range(k):
        basis[j] = q
        images[j] = _symv(a, q)
        r = images[j].copy()
        for _ in range(2):
            r -= basis[:j + 1].T @ (basis[:j + 1] @ r)
        norm = np.linalg.norm(r)
        if norm <= 1e-10 * max(np.linalg.norm(images[j]), 1e-300):
            basis, images = basis[:j + 1], images[:j + 1]
            break
        q = r / norm
    t = basis @ images.T
    vals, vecs = np.linalg.eigh((t + t.T) / 2)
    y = vecs[:, 0]
    vec = y @ basis
    return float(vals[0]), float(np.linalg.norm(y @ images - vals[0] * vec))


def best_diagonal(a: np.ndarray, blocks: list[slice], sweeps: int = 100, seed: int = 0, deadline: float = math.inf,
                  tol: float = 1e-10, max_rank: int = 64,
                  clock: Callable[[], float] = time.perf_counter) -> tuple[np.ndarray, np.ndarray]:
    """``(kappa_0, kappa)`` (n,) for the symmetric ``a`` (n, n), both triangles filled (see the module
    docstring), and the factor V (n, r) of the primal ``P = V V^T`` (its columns span ``A + K``'s near-null
    space: warm starts for the eigenvalue check). ``blocks`` (contiguous ranges: their rows are views)
    partition the coordinates 0..n-1, coordinate 0 (``P_00 = 1``) alone in the first. Stops after ``sweeps``,
    at ``deadline`` (read on ``clock``) or when the objective moved less than ``tol`` (relative) over the last 10 sweeps. The rank is ``sqrt(2 n) + 1`` (no spurious local
    minima, Boumal et al. 2016) up to ``max_rank`` (cost: 2 n^2 r per sweep)."""
    n = a.shape[0]
    r = min(n, int(math.ceil(math.sqrt(2 * n))) + 1, max_rank)
    v = np.random.default_rng(seed).standard_normal((n, r))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    d = np.diag(a).copy()
    last = math.inf
    for sweep in range(sweeps):
        for blk in blocks:
            g = a[blk] @ v - d[blk, None] * v[blk]
            norm = np.linalg.norm(g, axis=1)
            inside = (d[blk] > norm) & (np.arange(blk.start, blk.stop) != 0)  # the minimiser lies inside the ball
            new = -g / np.where(inside, d[blk], np.maximum(norm, 1e-300))[:, None]
            stuck = (norm == 0) & ~inside  # no direction: keep the row
            new[stuck] = v[blk][stuck]
            v[blk] = new
        if clock() > deadline:
            break
        if sweep % 10 == 9:
            value = float(np.einsum("ij,ij->", a @ v, v))
            if abs(last - value) <= tol * (1 + abs(value)):
                break
            last = value
    g = a @ v - d[:, None] * v
    norm = np.linalg.norm(g, axis=1)
    kappa = np.where(np.linalg.norm(v, axis=1) >= 1 - 1e-9, np.maximum(norm - d, 0.0), 0.0)
    kappa[0] = norm[0] - d[0]
    return kappa, v


def min_eigenvalue_lower(a: np.ndarray, start: np.ndarray | None = None) -> tuple[float, str]:
    """A proven lower bound of ``min(0, lambda_min(a))`` for the symmetric float64 matrix whose lower triangle
    ``a`` holds (``a`` is not changed), and how it was proven (``"cholesky"`` or ``"eigvalsh"``); ``start``: a
    warm start (n,) or block (n, r) for the Lanczos estimate that picks Cholesky's shift."""
    n = a.shape[0]
    if not np.isfinite(a).all():  # the upper triangle is never read, but must not hide a non-finite entry
        return -math.inf, "not finite"
    scale = max(1.0, float(np.abs(np.diag(a)).max()))
    theta, resid = dense_lanczos(a, start if start is not None else np.zeros(n))
    sigma = min(0.0, theta - 2 * resid - 1e-9 * scale)
    shifted = a.copy()
    shifted[np.diag_indices(n)] -= sigma
    trace = float(np.diag(shifted).sum())
    factor, info = lapack.dpotrf(shifted.T, lower=0, clean=0, overwrite_a=1)  # in place (see _symv)
    del factor, shifted
    if info == 0 and trace > 0:
        g = gamma(n + 1, U64)
        alpha = g / (1 - g) * trace * (1 + 2 * U64) + U64 * (scale + abs(sigma)) + 1e-300 * n
        return min(0.0, sigma - alpha), "cholesky"
    lam = float(sla.eigvalsh(a, lower=True, check_finite=False, subset_by_index=[0, 0], driver="evr")[0])
    off = sum(float(a[i, :i] @ a[i, :i]) for i in range(n))  # the lower triangle, row by row (no copy)
    norm = math.sqrt(2 * off + float(np.diag(a) @ np.diag(a))) * (1 + n * U64)
    return min(0.0, lam - 8 * n * 2 * U64 * norm), "eigvalsh"


__all__ = ["U64", "best_diagonal", "dense_lanczos", "lanczos_min", "min_eigenvalue_lower"]
