"""Float64 solves for the normal equations of locate-then-edit methods.

Every update has the form Delta = R K^T A^{-1} with A symmetric positive definite
(lambda C + K K^T). We never form A^{-1}: Cholesky factor once, solve, and fall back to an
eigen-decomposition solve with a warning when A is numerically singular.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class SingularMatrixError(RuntimeError):
    """The system matrix is singular or not finite; the message says what to change."""


def spd_solve(A: torch.Tensor, B: torch.Tensor, what: str = "system") -> torch.Tensor:
    """Solve A X = B for symmetric positive (semi-)definite A, in float64.

    Raises SingularMatrixError when A has non-finite entries or is singular beyond repair.
    """
    A = A.to(torch.float64)
    B = B.to(torch.float64)
    if not torch.isfinite(A).all():
        raise SingularMatrixError(
            f"{what}: matrix has NaN/inf entries (covariance statistics corrupt? delete the "
            f"cache file and recompute)"
        )
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        return torch.cholesky_solve(B, L)
    # Not positive definite in float64: solve on the eigenbasis, dropping null directions.
    evals, evecs = torch.linalg.eigh(A)
    top = evals.abs().max()
    keep = evals > top * 1e-12
    if top == 0 or keep.sum() == 0:
        raise SingularMatrixError(
            f"{what}: matrix is zero/singular; increase the covariance weight (lambda) or the "
            f"number of covariance samples"
        )
    log.warning("%s is not positive definite (min eigenvalue %.3g); using a pseudo-inverse "
                "solve over %d of %d directions", what, float(evals.min()), int(keep.sum()),
                len(evals))
    V = evecs[:, keep]
    return V @ ((V.T @ B) / evals[keep].unsqueeze(1))


def condition_number(A: torch.Tensor) -> float:
    """2-norm condition number of a symmetric matrix (logged per edit as a health signal)."""
    evals = torch.linalg.eigvalsh(A.to(torch.float64)).abs()
    lo = float(evals.min())
    return float("inf") if lo == 0 else float(evals.max()) / lo
