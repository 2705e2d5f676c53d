"""The float64 solves: the Woodbury step solver and MEMIT's low-rank update against a
direct float64 solve."""

import pytest
import torch

from factedit.linalg import (
    SingularMatrixError,
    WoodburySolver,
    condition_estimate,
    condition_number,
    memit_solve_is_low_rank,
    memit_system,
    memit_system_operator,
    memit_update,
    preserved_factor,
    residual_to_mlp_output,
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


@pytest.mark.parametrize("n", [1, 3])
def test_condition_estimate_from_factor_and_keys_equals_the_dense_estimate(n):
    """MEMIT's and D4S's steps log cond(lambda C + K K^T) from the factor of lambda C and the
    keys, never forming the matrix: the same estimate as from the dense matrix, and within
    the exact condition number (a lower bound that converges on a well-separated spectrum)."""
    g = torch.Generator().manual_seed(n)
    d, lam = 40, 7.0
    C = random_spd(d, g)
    K = 3 * torch.randn(d, n, dtype=torch.float64, generator=g)
    A = memit_system(C, K @ K.T, lam)
    operator = memit_system_operator(K, preserved_factor(C, lam), C, lam)
    B = torch.randn(d, 2, dtype=torch.float64, generator=g)
    assert torch.allclose(operator.matvec(B), A @ B, rtol=1e-12, atol=1e-12)
    factor_only = WoodburySolver(preserved_factor(C, lam), max_columns=n)
    factor_only.add(K)
    assert torch.allclose(factor_only.matvec(B), A @ B, rtol=1e-10, atol=1e-10)
    from_operator, dense = condition_estimate(operator), condition_estimate(A)
    assert from_operator == pytest.approx(dense, rel=1e-10)
    exact = condition_number(A)
    assert from_operator <= exact * (1 + 1e-10)
    assert from_operator == pytest.approx(exact, rel=1e-2)


@pytest.mark.parametrize("family", ["gemma3", "olmo2"])
def test_residual_share_written_through_the_post_mlp_norm(family):
    """Gemma 2/3 and OLMo 2 add norm(m) to the residual: the MLP-output change for a residual
    share r is the smallest-norm least-squares solution of J delta = r (J the norm's Jacobian
    at m, by autograd in float64: the reference), is orthogonal to m, and moves norm(m) by r
    to first order where r is reachable."""
    if family == "gemma3":
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm as Norm
    else:
        from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm as Norm
    g = torch.Generator().manual_seed(0)
    d, n = 24, 3
    norm = Norm(d, eps=1e-6).to(torch.float64)
    with torch.no_grad():
        norm.weight.copy_(0.5 + torch.rand(d, dtype=torch.float64, generator=g))
    m = 5 * torch.randn(d, n, dtype=torch.float64, generator=g)
    R = 40 * torch.randn(d, n, dtype=torch.float64, generator=g)
    delta = residual_to_mlp_output(norm, m, R)
    for c in range(n):
        J = torch.autograd.functional.jacobian(lambda x: norm(x[None])[0], m[:, c])
        # rcond drops the direction of m, where eps (and Gemma's float32 cast) leave J only
        # nearly singular
        reference = torch.linalg.lstsq(J, R[:, c:c + 1], rcond=1e-4,
                                       driver="gelsd").solution[:, 0]
        err = (delta[:, c] - reference).norm() / reference.norm()
        assert err < 1e-5, f"column {c}: relative error {err:.2e}"
        assert abs(float(delta[:, c] @ m[:, c])) < 1e-8 * float(delta[:, c].norm() * m[:, c].norm())
        # a small reachable share (J times some vector) is written exactly, to first order
        reachable = J @ torch.randn(d, dtype=torch.float64, generator=g) * 1e-3
        small = residual_to_mlp_output(norm, m[:, c:c + 1], reachable[:, None])[:, 0]
        moved = norm((m[:, c] + small)[None])[0] - norm(m[:, c][None])[0]
        assert (moved - reachable).norm() < 1e-2 * reachable.norm()  # float32 inside Gemma's norm


def test_residual_share_leaves_a_dimension_without_gain_alone():
    """An RMSNorm gain of zero (Gemma-3-270M has a few) leaves that output dimension fixed:
    no change is written there, and the rest still moves the output by the reachable share."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    g = torch.Generator().manual_seed(1)
    d = 16
    norm = Gemma3RMSNorm(d, eps=1e-6).to(torch.float64)
    with torch.no_grad():  # Gemma's gain is 1 + weight: weight -1 is a dead dimension
        norm.weight.copy_(torch.rand(d, dtype=torch.float64, generator=g) - 0.5)
        norm.weight[[2, 9]] = -1.0
    m = 5 * torch.randn(d, 1, dtype=torch.float64, generator=g)
    J = torch.autograd.functional.jacobian(lambda x: norm(x[None])[0], m[:, 0])
    reachable = J @ torch.randn(d, dtype=torch.float64, generator=g) * 1e-3
    delta = residual_to_mlp_output(norm, m, reachable[:, None])[:, 0]
    assert torch.isfinite(delta).all()
    assert delta[2] == 0 and delta[9] == 0
    moved = norm((m[:, 0] + delta)[None])[0] - norm(m[:, 0][None])[0]
    # Holding the dead dimensions leaves the scale-free direction to the live ones alone,
    # which moves the output a little off the share (1.4% here), not the 1e-3 of a full-gain
    # norm: the price of not writing a large change where the norm shows nothing.
    assert (moved - reachable).norm() < 5e-2 * reachable.norm()
