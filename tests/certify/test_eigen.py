"""Smallest eigenvalues for the first-order SDP: the proven lower bound is never above the true minimum
(50-digit reference on small matrices, also when Lanczos is started where it cannot see the minimum), the
Ritz estimates are upper estimates only, and the bound is tight when Lanczos has converged."""
from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from certify.eigen import best_diagonal, dense_lanczos, lanczos_min, min_eigenvalue_lower


def true_min(a: np.ndarray) -> float:
    """The smallest eigenvalue of the symmetric matrix in 50-digit arithmetic."""
    with mpmath.workdps(50):
        return float(min(mpmath.eigsy(mpmath.matrix(a.tolist()), eigvals_only=True)))


def lower_only(a: np.ndarray) -> np.ndarray:
    """What the SDP's checker stores: the lower triangle, the upper one left at zero."""
    return np.tril(a)


def matrix(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    if kind == "random":
        a = rng.standard_normal((n, n))
        return (a + a.T) / 2
    if kind == "nearly-psd":  # a cluster of tiny eigenvalues around 0, as at a nearly optimal dual
        vals = np.concatenate([rng.uniform(-1e-6, 1e-6, n // 3), rng.uniform(0.1, 5.0, n - n // 3)])
    elif kind == "psd-singular":
        vals = np.concatenate([[0.0, 0.0], rng.uniform(0.0, 3.0, n - 2)])
    else:  # "scaled": entries of very different sizes
        vals = rng.uniform(-1.0, 1.0, n) * 10.0 ** rng.uniform(-8, 3, n)
    return (q * vals) @ q.T


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["random", "nearly-psd", "psd-singular", "scaled"]), n=st.integers(2, 24),
       seed=st.integers(0, 10_000), start=st.sampled_from(["none", "random", "blind"]))
def test_lower_bound_never_above_the_true_minimum(kind, n, seed, start):
    rng = np.random.default_rng(seed)
    a = matrix(kind, n, rng)
    truth = true_min(a)
    v = None
    if start == "random":
        v = rng.standard_normal(n)
    elif start == "blind":  # orthogonal to the bottom eigenvector: Lanczos alone may never see it
        w = np.linalg.eigh(a)[1][:, 0]
        v = rng.standard_normal(n)
        v -= (v @ w) * w
    bound, how = min_eigenvalue_lower(lower_only(a), v)
    assert how in ("cholesky", "eigvalsh")
    assert bound <= min(0.0, truth)
    assert bound >= min(0.0, truth) - 1e-6 * (1 + np.abs(a).max())  # and tight


def test_a_missed_eigenvalue_is_caught():
    # the start vector spans an invariant subspace without the negative eigenvalue: Lanczos's Ritz value is
    # far above the minimum, Cholesky at that shift must fail and the exact decomposition decide
    a = np.diag([1.0, 2.0, 3.0, -0.5])
    theta, _ = dense_lanczos(a, np.array([1.0, 1.0, 1.0, 0.0]))
    assert theta >= 1.0 - 1e-12
    bound, how = min_eigenvalue_lower(a, np.array([1.0, 1.0, 1.0, 0.0]))
    assert how == "eigvalsh" and -0.5 - 1e-12 <= bound <= -0.5


def test_non_finite_matrix_gives_minus_infinity():
    a = np.eye(3)
    a[2, 0] = np.nan
    assert min_eigenvalue_lower(a)[0] == -np.inf


def test_block_lanczos_ritz_values_are_upper_estimates_and_converge():
    rng = np.random.default_rng(0)
    mats = [matrix("nearly-psd", 30, rng), matrix("random", 30, rng)]
    mask = torch.ones(2, 30, dtype=torch.float64)
    mask[0, 25:] = 0  # the first operator acts on 25 coordinates only
    mats[0][25:, :] = mats[0][:, 25:] = 0
    ops = torch.tensor(np.stack(mats))
    p = 3

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bij,bpj->bpi", ops, v.reshape(2, p, 30)).reshape(2 * p, 30)

    start = torch.zeros(2, p, 30, dtype=torch.float64)
    theta, vec = lanczos_min(matvec, start, mask, 2, torch.Generator().manual_seed(0))
    truth = [np.linalg.eigvalsh(mats[0][:25, :25]), np.linalg.eigvalsh(mats[1])]
    for b in range(2):
        assert (theta[b].numpy() >= truth[b][:p] - 1e-9).all()  # interlacing: never below
        assert torch.allclose(vec[b].norm(dim=1), torch.ones(p, dtype=torch.float64))
    assert float(vec[0, :, 25:].abs().max()) == 0.0  # stays on its coordinates
    for _ in range(30):  # warm-started repeatedly, it converges to the p smallest (the block's last slowest)
        theta, vec = lanczos_min(matvec, vec, mask, 3, torch.Generator().manual_seed(1))
    for b in range(2):
        assert theta[b, :p - 1].numpy() == pytest.approx(truth[b][:p - 1], abs=1e-6)
        assert theta[b, p - 1].item() == pytest.approx(truth[b][p - 1], abs=1e-3)


def best_trace(a: np.ndarray) -> float:
    """min kappa_0 + sum(kappa) over kappa >= 0 (kappa_0 free) with A + diag(kappa_0, kappa) PSD (Clarabel)."""
    import cvxpy as cp

    k = cp.Variable(a.shape[0])
    prob = cp.Problem(cp.Minimize(cp.sum(k)), [a + cp.diag(k) >> 0, k[1:] >= 0])
    prob.solve(solver=cp.CLARABEL)
    return float(prob.value)


@pytest.mark.parametrize("seed", [0, 1])
def test_best_diagonal_reaches_the_least_trace_diagonal(seed):
    # the mixing method's diagonal is what the dense check certifies with: -trace + (n + 1) min(0, lambda_min)
    # must come within 1e-4 of the optimum of the diagonal SDP (the dual of the box-constrained PSD problem);
    # blocks of uncoupled coordinates (diagonal A blocks) are updated together, as layer_blocks groups them
    rng = np.random.default_rng(seed)
    n = 16
    a = rng.standard_normal((n, n))
    a = (a + a.T) / 2
    a[1:6, 1:6] = np.diag(rng.uniform(-1, 1, 5))  # two blocks without couplings inside
    a[6:11, 6:11] = np.diag(rng.uniform(-1, 1, 5))
    blocks = [slice(0, 1), slice(1, 6), slice(6, 11)] + [slice(i, i + 1) for i in range(11, n)]
    kappa, factor = best_diagonal(a, blocks, sweeps=500)
    assert (kappa[1:] >= 0).all() and factor.shape[0] == n
    kappa[1:] = np.maximum(kappa[1:], 0)
    lam = np.linalg.eigvalsh(a + np.diag(kappa))[0]
    value = -kappa.sum() + n * min(0.0, lam)
    assert value == pytest.approx(-best_trace(a), abs=1e-4)
