"""Linear algebra: solves, inverse, Cholesky, determinants, eigh, svd, pinv, distances."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from zeroptim_cli.derivatives.taylor._core import TaylorUnsupported, coeffs, from_coeffs
from zeroptim_cli.derivatives.taylor.rules.elementwise import sqrt_series
from zeroptim_cli.derivatives.taylor.rules.registry import arg_value, need_constant, register

aten = torch.ops.aten


def _tr(m: Tensor) -> Tensor:
    """The trace over the last two dims."""
    return m.diagonal(0, -2, -1).sum(-1)


def _solve_series(A, B, X0: Tensor, solve: Callable, apply: Callable):
    """X with A(α)·X(α) = B(α) (``apply`` is the product A·X of the op's own kind): X_k = solve(B_k − Σ_{j≥1}
    A_j·X_{k−j}) for k = 1, 2, ``solve`` being the op's solve with A0."""
    Xs = [X0]
    for k in (1, 2):
        r = B[k]
        for j in range(1, k + 1):
            if A[j] is not None and Xs[k - j] is not None:
                t = apply(A[j], Xs[k - j])
                r = -t if r is None else r - t
        Xs.append(None if r is None else solve(r))
    return Xs[1], Xs[2]


@register(aten._linalg_solve_ex)
def _linalg_solve(func, args, kwargs):
    """linalg.solve: A X = B (X A = B with left=False): X_k = A0⁻¹(B_k − A1 X_{k−1} − A2 X_{k−2}); a vector B
    (X of one dimension less than A) is solved as one column (row for left=False)."""
    A, B = coeffs(args[0]), coeffs(args[1])
    left = arg_value(func, args, kwargs, "left", True)
    X0, LU, piv, info = func(A[0], B[0], *args[2:], **kwargs)
    vec = X0.dim() == A[0].dim() - 1
    ax = -1 if left else -2

    def mat(t):
        return t.unsqueeze(ax) if vec and t is not None else t
    lu, pv = torch.linalg.lu_factor(A[0])
    X1, X2 = _solve_series(A, [None, mat(B[1]), mat(B[2])], mat(X0),
                           lambda r: torch.linalg.lu_solve(lu, pv, r, left=left),
                           lambda a, x: a @ x if left else x @ a)
    return from_coeffs(X0, *(None if t is None else (t.squeeze(ax) if vec else t) for t in (X1, X2))), LU, piv, info


@register(aten.linalg_solve_triangular)
def _solve_triangular(func, args, kwargs):
    """solve_triangular: as linalg.solve with A's coefficients cut to the triangle the op reads (strictly, with
    unitriangular=True)."""
    A, B = coeffs(args[0]), coeffs(args[1])
    upper = arg_value(func, args, kwargs, "upper")
    left = arg_value(func, args, kwargs, "left", True)
    unit = arg_value(func, args, kwargs, "unitriangular", False)
    X0 = func(A[0], B[0], *args[2:], **kwargs)
    band = (lambda t: torch.triu(t, int(unit))) if upper else (lambda t: torch.tril(t, -int(unit)))
    At = [A[0]] + [None if t is None else band(t) for t in A[1:]]
    X1, X2 = _solve_series(At, B, X0, lambda r: func(A[0], r, *args[2:], **kwargs),
                           lambda a, x: a @ x if left else x @ a)
    return from_coeffs(X0, X1, X2)


@register(aten.linalg_cholesky_ex)
def _cholesky(func, args, kwargs):
    """cholesky (real, A = L Lᵀ, A_k symmetrised as autograd does): L_k = L0 Φ(L0⁻¹ R_k L0⁻ᵀ), R1 = A1,
    R2 = A2 − L1 L1ᵀ, Φ = lower triangle with the diagonal halved."""
    A = coeffs(args[0])
    if A[0].is_complex():
        raise TaylorUnsupported(f"{func}: complex input has no Taylor rule")
    upper = arg_value(func, args, kwargs, "upper", False)
    L0, info = func(A[0], *args[1:], **kwargs)
    lo = L0.mT if upper else L0

    def step(r):
        y = torch.linalg.solve_triangular(lo, 0.5 * (r + r.mT), upper=False)
        m = torch.linalg.solve_triangular(lo, y.mT, upper=False)  # L0⁻¹ R L0⁻ᵀ (symmetric)
        return lo @ (m.tril() - 0.5 * torch.diag_embed(m.diagonal(0, -2, -1)))
    L1 = None if A[1] is None else step(A[1])
    r2 = A[2]
    if L1 is not None:
        t = L1 @ L1.mT
        r2 = -t if r2 is None else r2 - t
    L2 = None if r2 is None else step(r2)
    return from_coeffs(L0, *(None if t is None else (t.mT if upper else t) for t in (L1, L2))), info


@register(aten.linalg_inv_ex)
def _linalg_inv(func, args, kwargs):
    """inv: X = A⁻¹: X1 = −X0 A1 X0, X2 = −X0 (A1 X1 + A2 X0)."""
    A = coeffs(args[0])
    X0, info = func(A[0], *args[1:], **kwargs)
    X1, X2 = _solve_series(A, [None, None, None], X0, lambda r: X0 @ r, lambda a, x: a @ x)
    return from_coeffs(X0, X1, X2), info


def _lu_quotients(func, A, d0):
    """M_k = A0⁻¹ A_k; refused where A0 is singular (the rules below need its inverse)."""
    if bool((d0 == 0).any()):
        raise TaylorUnsupported(f"{func}: the matrix is exactly singular (the rule needs its inverse)")
    lu, piv = torch.linalg.lu_factor(A[0])
    return [None if a is None else torch.linalg.lu_solve(lu, piv, a) for a in A[1:]]


def _logdet_series(M1, M2):
    """log det(A0 + A1 α + A2 α²) − log det A0 = tr M1 α + (tr M2 − ½ tr M1²) α² + O(α³)."""
    l1 = None if M1 is None else _tr(M1)
    l2 = None if M2 is None else _tr(M2)
    if M1 is not None:
        t = -0.5 * (M1 * M1.mT).sum((-2, -1))
        l2 = t if l2 is None else l2 + t
    return l1, l2


@register(aten.linalg_matrix_exp)
def _matrix_exp(func, args, kwargs):
    """matrix_exp: exp of the block-Toeplitz matrix [[A0, A1, A2], [0, A0, A1], [0, 0, A0]] has the series
    E0, E1, E2 of exp(A(α)) in its first block row (a truncated series of matrices is an algebra)."""
    A = coeffs(args[0])
    n = A[0].shape[-1]
    z = torch.zeros_like(A[0])
    a1 = z if A[1] is None else A[1]
    a2 = z if A[2] is None else A[2]
    T = torch.cat([torch.cat(r, -1) for r in ((A[0], a1, a2), (z, A[0], a1), (z, z, A[0]))], -2)
    E = func(T)[..., :n, :]
    return from_coeffs(func(A[0]), E[..., n:2 * n], E[..., 2 * n:])


@register(aten._linalg_det)
def _linalg_det(func, args, kwargs):
    """det: d1 = d0 l1, d2 = d0 (l2 + ½ l1²) with (l1, l2) the log-det series (``_logdet_series``)."""
    A = coeffs(args[0])
    d0, LU, piv = func(A[0])
    l1, l2 = _logdet_series(*_lu_quotients(func, A, d0))
    d2 = l2
    if l1 is not None:
        t = 0.5 * l1 * l1
        d2 = t if d2 is None else d2 + t
    return from_coeffs(d0, None if l1 is None else d0 * l1, None if d2 is None else d0 * d2), LU, piv


@register(aten._linalg_slogdet)
def _linalg_slogdet(func, args, kwargs):
    """slogdet (real): sign is piecewise constant; log|det| = the log-det series (``_logdet_series``)."""
    A = coeffs(args[0])
    if A[0].is_complex():
        raise TaylorUnsupported(f"{func}: complex input (its sign depends on α); no Taylor rule")
    sign, logabs, LU, piv = func(A[0])
    return sign, from_coeffs(logabs, *_logdet_series(*_lu_quotients(func, A, sign))), LU, piv


def _sym_eig_series(func, lam0: Tensor, B1, B2):
    """Eigen-series of a symmetric B(α) = Λ0 + B1 α + B2 α² (B written in the eigenbasis at α = 0), eigenvector
    matrix I + C1 α + C2 α²: λ1 = diag B1, C1_ji = B1_ji/(λ_i − λ_j), T = B2 + B1 C1, λ2 = diag T,
    C2_ji = (T_ji − C1_ji λ1_i)/(λ_i − λ_j) for j ≠ i, C1_ii = 0, C2_ii = −½ Σ_j C1_ji². Refused at a tie."""
    n = lam0.shape[-1]
    gap = lam0.unsqueeze(-2) - lam0.unsqueeze(-1)  # [j, i] = λ_i − λ_j
    off = ~torch.eye(n, dtype=torch.bool, device=lam0.device)
    if bool((gap[..., off] == 0).any()):
        raise TaylorUnsupported(f"{func}: repeated eigenvalues (singular values) are not differentiable")
    inv = torch.where(off, 1 / torch.where(off, gap, 1), 0)
    C1 = None if B1 is None else B1 * inv
    lam1 = None if B1 is None else B1.diagonal(0, -2, -1)
    T = B2
    if C1 is not None:
        t = B1 @ C1
        T = t if T is None else T + t
    lam2 = None if T is None else T.diagonal(0, -2, -1)
    C2 = None
    if T is not None:
        C2 = (T if C1 is None else T - C1 * lam1.unsqueeze(-2)) * inv
        if C1 is not None:
            C2 = C2 - 0.5 * torch.diag_embed((C1 * C1).sum(-2))
    return lam1, lam2, C1, C2


@register(aten._linalg_eigh)
def _linalg_eigh(func, args, kwargs):
    """eigh (real symmetric; A_k symmetrised, as autograd does): B_k = V0ᵀ A_k V0 through ``_sym_eig_series``;
    eigenvectors V_k = V0 C_k."""
    A = coeffs(args[0])
    if A[0].is_complex():
        raise TaylorUnsupported(f"{func}: complex (Hermitian) input has no Taylor rule")
    uplo = arg_value(func, args, kwargs, "UPLO", "L")
    compute_v = arg_value(func, args, kwargs, "compute_v", True)
    lam0, V0 = func(A[0], uplo, True)
    B = [None if a is None else V0.mT @ (0.5 * (a + a.mT)) @ V0 for a in A[1:]]
    lam1, lam2, C1, C2 = _sym_eig_series(func, lam0, *B)
    vals = from_coeffs(lam0, lam1, lam2)
    if not compute_v:
        return vals, func(A[0], uplo, False)[1]
    return vals, from_coeffs(V0, *(None if c is None else V0 @ c for c in (C1, C2)))


@register(aten._linalg_svd)
def _linalg_svd(func, args, kwargs):
    """svd (real; tall, else of Aᵀ): σ² are the eigenvalues of AᵀA, whose series in A0's right singular basis
    is B1 = ΣP1 + P1ᵀΣ, B2 = ΣP2 + P2ᵀΣ + (A1V0)ᵀ(A1V0), P_k = U0ᵀ A_k V0 (``_sym_eig_series``); σ = √λ
    (``sqrt_series``); V_k = V0 C_k and U = A V Σ⁻¹. Full U or Vh of a non-square matrix is refused."""
    A = coeffs(args[0])
    full = arg_value(func, args, kwargs, "full_matrices", False)
    compute_uv = arg_value(func, args, kwargs, "compute_uv", True)
    driver = arg_value(func, args, kwargs, "driver")
    m, n = A[0].shape[-2:]
    if A[0].is_complex() or (compute_uv and full and m != n):
        raise TaylorUnsupported(f"{func}: complex input or full singular vectors of a non-square matrix: no Taylor "
                                "rule")
    out = func(A[0], full, compute_uv, driver=driver)
    U0, S0, Vh0 = out if compute_uv else func(A[0], False, True, driver=driver)
    wide = m < n
    if wide:  # A' = Aᵀ = V Σ Uᵀ
        A = [None if a is None else a.mT for a in A]
    left, right = (Vh0.mT, U0) if wide else (U0, Vh0.mT)
    P = [None if a is None else left.mT @ a @ right for a in A[1:]]
    B = [None if p is None else S0.unsqueeze(-1) * p + p.mT * S0.unsqueeze(-2) for p in P]
    if A[1] is not None:
        av = A[1] @ right
        B[1] = av.mT @ av if B[1] is None else B[1] + av.mT @ av
    lam1, lam2, C1, C2 = _sym_eig_series(func, S0 * S0, *B)
    S = from_coeffs(S0, *sqrt_series(S0, lam1, lam2))
    if not compute_uv:
        return out[0], from_coeffs(out[1], *coeffs(S)[1:]), out[2]
    R = from_coeffs(right, *(None if c is None else right @ c for c in (C1, C2)))
    L = from_coeffs(left, *coeffs((from_coeffs(*A) @ R) / S.unsqueeze(-2))[1:])
    U, V = (R, L) if wide else (L, R)
    return U, S, from_coeffs(Vh0, *(None if c is None else c.mT for c in coeffs(V)[1:]))


@register(aten.linalg_pinv.atol_rtol_tensor)
def _linalg_pinv(func, args, kwargs):
    """pinv = V_r Σ_r⁻¹ U_rᵀ over the r singular values above the op's cutoff at α = 0 (a rank that does not change
    near α = 0), through the svd rule."""
    x = args[0]
    need_constant(func, (), kwargs)
    atol, rtol, herm = (kwargs.get(k) for k in ("atol", "rtol", "hermitian"))
    x0 = coeffs(x)[0]
    ranks = torch.linalg.matrix_rank(x0, atol=atol, rtol=rtol, hermitian=bool(herm))
    r = int(ranks.reshape(-1)[0]) if ranks.numel() else 0
    if bool((ranks != r).any()):
        raise TaylorUnsupported(f"{func}: the matrices of the batch have different ranks")
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    p = (Vh[..., :r, :].mT / S[..., None, :r]) @ U[..., :, :r].mT
    return from_coeffs(func(x0, **kwargs), *coeffs(p)[1:])


@register(aten._cdist_forward)
def _cdist(func, args, kwargs):
    """cdist: d_ij = ‖x_i − y_j‖_p over the differences as Taylor tensors; p = 2 as √(Σ diff²) with zero
    coefficients at distance 0 (autograd's convention, ``sqrt_series``)."""
    x1, x2, p = args[0], args[1], args[2]
    o0 = func(coeffs(x1)[0], coeffs(x2)[0], *args[2:], **kwargs)
    return _p_distance(o0, x1.unsqueeze(-2) - x2.unsqueeze(-3), p)


def _p_distance(o0: Tensor, diff: Tensor, p: float) -> Tensor:
    """‖diff‖_p over the last dim, its value o0 torch's own; p = 2 as √(Σ diff²) (``sqrt_series``)."""
    if p == 2:
        s = (diff * diff).sum(-1)
        return from_coeffs(o0, *sqrt_series(o0, *coeffs(s)[1:]))
    return from_coeffs(o0, *coeffs(torch.linalg.vector_norm(diff, p, -1))[1:])


@register(aten._pdist_forward)
def _pdist(func, args, kwargs):
    """pdist: the distances ‖x_i − x_j‖_p for i < j (row-major), as cdist."""
    x, p = args[0], arg_value(func, args, kwargs, "p", 2)
    o0 = func(coeffs(x)[0], p)
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
    return _p_distance(o0, x[i] - x[j], p)
