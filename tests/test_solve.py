"""The float64 solves: the Woodbury step solver against a direct float64 solve."""

import pytest
import torch

from factedit.linalg import SingularMatrixError, WoodburySolver, spd_solve


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
