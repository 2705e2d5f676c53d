"""The float64 solves: the Woodbury step solver and MEMIT's low-rank update against a
direct float64 solve."""

import pytest
import torch

from factedit.linalg import (
    SingularMatrixError,
    WoodburySolver,
    memit_solve_is_low_rank,
    memit_system,
    memit_update,
    preserved_factor,
    solve_update,
    spd_solve,
)


def random_spd(d: int, generator: torch.Generator) -> torch.Tensor:
    X = torch.randn(d, 3 * d, dtype=torch.float64, generator=generator)
    return X @ X.T / (3 * d) + 1e-2 * torch.eye(d, dtype=torch.float64)


def test_woodbury_solver_tracks_a_growing_sum_of_key_products():
    """After each batch of added columns, solving with the old factor equals a fresh float64
    solve of the grown matrix; `room` stops the growth at max_columns."""
    g = torch.Generator().manual_seed(0)
    d = 48
    A = random_spd(d, g)
    solver = WoodburySolver.factor(A, max_columns=7)
    assert solver is not None
    for k in (1, 2, 1, 3):  # 7 columns in all, as sequential edits of 1-3 requests add them
        assert solver.room(k)
        V = torch.randn(d, k, dtype=torch.float64, generator=g)
        A = A + V @ V.T
        solver.add(V)
        B = torch.randn(d, 2, dtype=torch.float64, generator=g)
        expected = torch.linalg.solve(A, B)
        err = (solver.solve(B) - expected).norm() / expected.norm()
        assert err < 1e-10, f"relative error {err:.2e}"
    assert not solver.room(1)


def test_woodbury_solver_refuses_a_matrix_that_is_not_positive_definite():
    A = torch.diag(torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))
    assert WoodburySolver.factor(A) is None
    with pytest.raises(SingularMatrixError, match="NaN/inf"):
        spd_solve(torch.full((2, 2), float("nan")), torch.ones(2, 1))


@pytest.mark.parametrize("n", [1, 3])
def test_memit_update_from_the_factor_of_lambda_c_equals_the_direct_solve(n):
    """R K^T (lambda C + K K^T)^{-1} by Woodbury from lambda C's factor equals the direct
    solve and a float64 LU reference, for one request and for a small batch."""
    g = torch.Generator().manual_seed(n)
    d_in, d_out, lam = 40, 12, 7.0
    C = random_spd(d_in, g)
    K = 3 * torch.randn(d_in, n, dtype=torch.float64, generator=g)
    R = torch.randn(d_out, n, dtype=torch.float64, generator=g)
    assert memit_solve_is_low_rank(K)
    fast = memit_update(R, K, preserved_factor(C, lam))
    direct = solve_update(R @ K.T, memit_system(C, K @ K.T, lam))
    reference = torch.linalg.solve(lam * C + K @ K.T, (R @ K.T).T).T
    for other in (direct, reference):
        err = (fast - other).norm() / other.norm()
        assert err < 1e-10, f"relative error {err:.2e}"


def test_memit_low_rank_solve_is_chosen_only_where_it_pays_and_is_safe():
    K = torch.ones(40, 9, dtype=torch.float64)
    assert memit_solve_is_low_rank(K)
    assert not memit_solve_is_low_rank(torch.ones(40, 10, dtype=torch.float64))  # n >= d/4
    K[3, 2] = float("nan")
    assert not memit_solve_is_low_rank(K)  # the direct solve names the bad matrix
    assert preserved_factor(torch.diag(torch.tensor([1.0, -1.0])), 2.0) is None
