"""The update algebra the MEMIT family shares: residual spreading, normal-equation solves,
the null-space basis and solve, and the weight statistics logged after every edit.

Notation (MEMIT paper): at edited layer l_j (j = 0..L-1) the keys of n requests are the
columns of K (d_in, n); the residual R (d_out, n) is what the layer's output still has to
move; C = E[k k^T] is the key second moment over a text corpus. Every method here solves

    Delta = B A^{-1},   A symmetric positive definite (d_in, d_in),  B (d_out, d_in)

with (B, A) = (R K^T, lambda C + K K^T) for MEMIT/PMET, (S_RK, lambda C + S_KK) for D4S and
(R K^T P, P S P + alpha I) for AlphaEdit (solved in the null space's own coordinates, an
m x m system: `null_space_update`). The solve is one Cholesky factorisation of A on the
transposed system A Delta^T = B^T (A is symmetric), in float64: no inverse is ever formed.
"""

from __future__ import annotations

import torch

from ..models import EditableModel
from .keys import capture_at_subject, subject_rows
from .solve import (
    WoodburySolver,
    cholesky_factor,
    condition_number,
    factor_solve,
    spd_solve,
)
from .values import site_module_name


def spread_residual(z: torch.Tensor, h: torch.Tensor, layers_left: int,
                    exponent: float = 1.0) -> torch.Tensor:
    """R = (z - h) / layers_left**exponent, as columns: (n, d) rows in, (d, n) out.

    MEMIT spreads the remaining residual evenly over the layers still to edit (exponent 1:
    R_j = (z - h_j) / (L - j)); PMET spreads it by the square root (exponent 0.5), so the
    layers together overshoot the residual on purpose.
    """
    if layers_left < 1:
        raise ValueError(f"layers_left must be >= 1, got {layers_left}")
    return ((z - h).to(torch.float64) / float(layers_left) ** exponent).T


def residual_to_mlp_output(norm: torch.nn.Module, m: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The MLP-output change (d, n) whose normalised output changes by R (d, n), to first order.

    Where a block adds norm(m) to the residual instead of the MLP output m (Gemma 2/3, OLMo 2:
    an RMSNorm, y = g * m / rms(m)), a layer's share r of the residual change must be written
    as a change delta of m. The norm's Jacobian at m is J = diag(g) P / rms(m), P the
    projection orthogonal to m (its output ignores the scale of m), so J delta = r has, where
    every gain is non-zero, the least-squares solution of smallest norm

        delta = rms(m) (a - (u.a / u.b) b),   a = r / g,  b = u / g^2,  u = m / ||m||,

    the unconstrained D^-1 r moved, in g's metric, off the direction that the norm discards.
    The part of r that no delta reaches (the norm's output has a fixed scale) is left to the
    layers after, which re-read the residual. Without this, a share sized for the residual
    (||h|| ~ 1,000-3,600 on Gemma-3-270M's layers 1-7) lands on MLP outputs of norm 4-11.

    m: the current MLP outputs at the key columns, (d, n); float64 out. g is read from the
    module as norm(1, ..., 1) (an RMSNorm of the ones vector is its gain) and rms(m) from its
    output, so any RMSNorm form (Gemma's 1 + w, OLMo's w, its own eps) is taken as it is.
    """
    m64, R64 = m.to(torch.float64), R.to(torch.float64)
    weight = next(norm.parameters())
    with torch.no_grad():
        gain = norm(torch.ones(1, m.shape[0], dtype=weight.dtype, device=weight.device))
        out = norm(m.T.to(weight.dtype, copy=True).to(weight.device)).T
    gain = gain[0].to("cpu", torch.float64)
    # A dimension whose gain is (nearly) zero has no output to move: no change is written
    # there (dividing by its gain would put an enormous one; Gemma-3-270M has such gains).
    live = (gain.abs() > torch.finfo(torch.float32).eps * float(gain.abs().max()))[:, None]
    inverse_gain = torch.where(live, 1.0 / torch.where(live, gain[:, None], 1.0), 0.0)
    out = out.to("cpu", torch.float64)
    smallest = torch.finfo(torch.float64).tiny
    rms = (gain[:, None] * m64).norm(dim=0) / out.norm(dim=0).clamp_min(smallest)
    u = m64 / m64.norm(dim=0).clamp_min(smallest)
    a, b = R64 * inverse_gain, u * inverse_gain**2
    return rms * (a - ((u * a).sum(0) / (u * b).sum(0).clamp_min(smallest)) * b)


def memit_system(C: torch.Tensor, KK: torch.Tensor, lam: float) -> torch.Tensor:
    """A = lambda C + K K^T: preserve the corpus keys (weighted lambda) and write the new ones."""
    return lam * C.to(torch.float64) + KK.to(torch.float64)


def solve_update(B: torch.Tensor, A: torch.Tensor, what: str = "update") -> torch.Tensor:
    """Delta = B A^{-1} for symmetric positive definite A: (d_out, d_in), float64.

    Solved as A Delta^T = B^T (A = A^T), one Cholesky factorisation, never an inverse.
    """
    return spd_solve(A, B.to(torch.float64).T, what=what).T


def preserved_factor(C: torch.Tensor, lam: float) -> torch.Tensor | None:
    """L with L L^T = lambda C (float64), or None when lambda C is not positive definite.

    lambda C is the part of MEMIT's system matrix that no edit changes: factored once per
    layer, it makes every later edit's solve a low-rank one (`memit_update`).
    """
    return cholesky_factor(lam * C.to(torch.float64))


def memit_update(R: torch.Tensor, K: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Delta = R K^T (lambda C + K K^T)^{-1} from the factor L L^T = lambda C: (d_out, d_in).

    A = lambda C + K K^T is symmetric, so R K^T A^{-1} = R (A^{-1} K)^T, and by the Woodbury
    identity, with Y = (lambda C)^{-1} K,

        A^{-1} K = Y (I + K^T Y)^{-1},

    an n x n system (n = columns of K) that is SPD with eigenvalues >= 1. Per edit that is
    two triangular solves per key column instead of a fresh d_in^3 / 3 factorisation and
    d_out right-hand sides: on SmolLM2's 1,536-wide layers 0.03 s instead of 0.3 s for one
    request, and the gap grows with d_in (measured: 1e-14 relative to the direct solve).
    Worth it while n is well below d_in; `memit_solve_is_low_rank` says when.
    """
    K = K.to(torch.float64)
    return R.to(torch.float64) @ keys_added_solve(factor_solve(factor, K), K).T


def memit_system_operator(K: torch.Tensor, factor: torch.Tensor, C: torch.Tensor,
                          lam: float) -> WoodburySolver:
    """lambda C + K K^T as lambda C, its factor L L^T = lambda C and the keys, never formed:
    what the condition estimate needs (products and solves) without a d_in^3 / 3
    factorisation of its own."""
    system = WoodburySolver(factor, max_columns=K.shape[1], A0=lam * C.to(torch.float64))
    system.add(K)
    return system


def keys_added_solve(Y: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """(A + K K^T)^{-1} K from Y = A^{-1} K, A SPD: Y (I + K^T Y)^{-1} (Woodbury).

    I + K^T Y = I + K^T A^{-1} K is SPD with eigenvalues >= 1: an n x n Cholesky solve.
    """
    small = torch.eye(K.shape[1], dtype=torch.float64) + K.T @ Y
    return torch.cholesky_solve(Y.T, torch.linalg.cholesky(small)).T


def memit_solve_is_low_rank(K: torch.Tensor) -> bool:
    """Whether `memit_update` beats a fresh factorisation for these keys (n < d_in / 4) and
    they are finite (non-finite keys go to the direct solve, whose error names them)."""
    return K.shape[1] * 4 < K.shape[0] and bool(torch.isfinite(K).all())


def null_space_basis(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """U (d_in, m): orthonormal eigenvectors of C whose eigenvalue is < threshold * max."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    evals, evecs = torch.linalg.eigh(C.to(torch.float64))
    return evecs[:, evals < threshold * evals.max()].contiguous()


def null_space_update(U: torch.Tensor, BU: torch.Tensor, G: torch.Tensor, alpha: float,
                      what: str = "update") -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's Delta = B P (S P + alpha I)^{-1}, solved in the null space's coordinates.

    P = U U^T projects onto C's null space: for a key k the corpus holds, P k ~ 0, so an update
    of the form X P leaves W k unchanged (AlphaEdit's preserved-knowledge guarantee).

    First, B P (S P + alpha I)^{-1} = B P (P S P + alpha I)^{-1}: for X = B P (S P +
    alpha I)^{-1}, X (S P + alpha I)(I - P) = alpha X (I - P) = B P (I - P) = 0, so X = X P and
    X (P S P + alpha I) = X S P + alpha X = B P. The right-hand form is SPD (alpha > 0): a
    Cholesky solve, where AlphaEdit's reference code needs a general one. Then, with U
    orthonormal (m columns), (U G U^T + alpha I) U = U (G + alpha I) for G = U^T S U, so
    (P S P + alpha I)^{-1} U = U (G + alpha I)^{-1} and

        Delta = (B U) (G + alpha I)^{-1} U^T.

    The system is m x m instead of d_in x d_in, and forming it needs no d_in^3 products
    (P S P costs two; on SmolLM2's layers that was 0.9 s of AlphaEdit's ~1 s per layer).
    Takes B U (d_out, m) and G (m, m); returns (Delta, G + alpha I).
    """
    A = G.to(torch.float64) + alpha * torch.eye(G.shape[0], dtype=torch.float64)
    return solve_update(BU, A, what) @ U.T, A


def site_values(model: EditableModel, requests, layer: int, site: str) -> torch.Tensor:
    """The value at `site` of `layer` at the subject token of each bare prompt: (n, d)."""
    rows = subject_rows(model, requests, ["{}"])
    name = site_module_name(model, layer, site)
    return capture_at_subject(model, rows, [name], "output")[name]


def condition_estimate(A: torch.Tensor | WoodburySolver, iters: int = 30) -> float:
    """cond_2(A) of an SPD matrix from power and inverse iteration: a lower bound, cheap.

    An exact eigvalsh of a 1536 x 1536 matrix takes ~3 s on two CPU cores, a Cholesky factor
    ~0.1-0.2 s; logged after every edit of every layer, the exact value would dominate the
    edit. The Rayleigh quotients bound lambda_max from below and lambda_min from above, so
    the estimate never exceeds the true condition number. A dense A is factored here (the
    exact value where it is not positive definite); a WoodburySolver already holds its
    factor and low-rank part, and is used as it stands (no d^2 matrix formed, no new factor).
    """
    if isinstance(A, WoodburySolver):
        return _rayleigh_condition(A.matvec, A.solve, A.L.shape[0], iters)
    A = A.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        return condition_number(A)
    return _rayleigh_condition(lambda v: A @ v, lambda u: factor_solve(L, u), A.shape[0], iters)


def _rayleigh_condition(product, solve, d: int, iters: int) -> float:
    """lambda_max / lambda_min estimated by `iters` power steps with `product` (A v) and
    inverse steps with `solve` (A^{-1} u), both from one fixed start vector."""
    # A fixed generator: the estimate must not consume the global random stream.
    v = torch.randn(d, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u = v.clone()
    for _ in range(iters):
        v = product(v)
        v /= v.norm()
        u = solve(u)
        u /= u.norm()
    lam_max = float(v.T @ product(v))
    lam_min = float(u.T @ product(u))
    return float("inf") if lam_min <= 0 else lam_max / lam_min


def weight_stats(W: torch.Tensor, W0: torch.Tensor) -> dict[str, float]:
    """mean |W| (L1 / numel, as the D4S paper logs it) and ||W - W_0||_F, in float64."""
    W = W.to(torch.float64)
    return {"mean_abs": float(W.abs().mean()),
            "fro_change": float((W - W0.to(torch.float64)).norm())}
