"""FID and KID between two sets of Inception features (float64 throughout).

FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the two feature sets,
``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``. The trace of the matrix square root is computed without
a general ``sqrtm`` (scipy is not a dependency): with ``S1 = V diag(w) V^T`` (symmetric eigendecomposition),
``S1 S2`` is similar to the symmetric positive semi-definite ``M = diag(w)^(1/2) V^T S2 V diag(w)^(1/2)``, so
``tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(M))``. Both decompositions are symmetric, so no complex parts arise
(``scipy.linalg.sqrtm`` of the non-symmetric product returns small imaginary parts that the usual code discards);
eigenvalues within rounding error of zero (the covariances are singular with fewer samples than dimensions) are set
to zero.

KID (Bińkowski et al. 2018) as torch-fidelity and clean-fid define it: the unbiased estimator of the squared MMD
with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over ``subsets`` random subsets of
``subset_size`` features of each set (drawn without replacement, capped by the smaller set's size); the mean and
the (population) standard deviation over the subsets are reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

Array = np.ndarray | torch.Tensor

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
KID_SEED = 0


def _float64(values: Array, name: str, ndim: int) -> torch.Tensor:
    tensor = torch.as_tensor(values).detach().to("cpu", torch.float64)
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return tensor


def feature_statistics(features: Array) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] (divided by N - 1) of features [N, D], N >= 2."""
    x = _float64(features, "features", 2)
    if x.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {x.shape[0]}")
    mean = x.mean(dim=0)
    centered = x - mean
    return mean, centered.T @ centered / (x.shape[0] - 1)


def trace_sqrt_product(sigma1: Array, sigma2: Array) -> float:
    """``tr((S1 S2)^(1/2))`` of two symmetric positive semi-definite matrices (see the module docstring)."""
    s1 = _float64(sigma1, "sigma1", 2)
    s2 = _float64(sigma2, "sigma2", 2)
    eigenvalues, eigenvectors = torch.linalg.eigh((s1 + s1.T) / 2)
    root = _above_rounding(eigenvalues).sqrt()
    rotated = eigenvectors.T @ ((s2 + s2.T) / 2) @ eigenvectors
    middle = root[:, None] * rotated * root[None, :]
    return float(_above_rounding(torch.linalg.eigvalsh((middle + middle.T) / 2)).sqrt().sum())


def _above_rounding(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a positive semi-definite matrix with those within rounding error of zero (below
    ``n * eps * max|lambda|``, the accuracy of a symmetric eigensolver) set to zero: a singular covariance's zero
    eigenvalues come out as +-1e-14, whose square roots would otherwise add up to a visible error."""
    tolerance = eigenvalues.abs().max() * eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps
    return torch.where(eigenvalues > tolerance, eigenvalues, torch.zeros_like(eigenvalues))


def frechet_distance(mu1: Array, sigma1: Array, mu2: Array, sigma2: Array) -> float:
    """FID from the means [D] and covariances [D, D] of two feature sets."""
    m1, m2 = _float64(mu1, "mu1", 1), _float64(mu2, "mu2", 1)
    s1, s2 = _float64(sigma1, "sigma1", 2), _float64(sigma2, "sigma2", 2)
    d = m1.shape[0]
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"FID statistics do not match: means {tuple(m1.shape)} and {tuple(m2.shape)}, covariances "
            f"{tuple(s1.shape)} and {tuple(s2.shape)}"
        )
    diff = m1 - m2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2)) - 2 * trace_sqrt_product(s1, s2)


def fid_from_features(features1: Array, features2: Array) -> float:
    """FID between two feature sets [N1, D] and [N2, D]."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


@dataclass(frozen=True)
class KID:
    mean: float
    std: float
    subsets: int
    subset_size: int


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 of two samples [m, D] with the kernel ``(a.b / D + 1)^3`` (diagonal terms left out)."""
    m, d = x.shape

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.T / d + 1) ** 3

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / m**2


def kernel_inception_distance(
    features1: Array,
    features2: Array,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = KID_SEED,
) -> KID:
    """KID between feature sets [N1, D] and [N2, D] (see the module docstring); subsets drawn with ``seed``."""
    x = _float64(features1, "features1", 2)
    y = _float64(features2, "features2", 2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"KID feature sizes differ: {x.shape[1]} and {y.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {x.shape[0]} and {y.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    values = torch.stack(
        [
            polynomial_mmd2(
                x[torch.randperm(x.shape[0], generator=generator)[:m]],
                y[torch.randperm(y.shape[0], generator=generator)[:m]],
            )
            for _ in range(subsets)
        ]
    )
    return KID(float(values.mean()), float(values.std(correction=0)), subsets, m)
