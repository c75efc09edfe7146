"""Image similarity after registration: normalised cross-correlation and normalised mutual information."""

from __future__ import annotations

import numpy as np


def _pair(first: np.ndarray, second: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.shape != second.shape:
        raise ValueError(f"images differ in shape: {first.shape} vs {second.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        return first[mask], second[mask]
    return first.reshape(-1), second.reshape(-1)


def normalized_cross_correlation(
    first: np.ndarray, second: np.ndarray, mask: np.ndarray | None = None
) -> float:
    """Pearson correlation of the intensities (over `mask`, if given); NaN for a constant image."""
    a, b = _pair(first, second, mask)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def normalized_mutual_information(
    first: np.ndarray, second: np.ndarray, *, bins: int = 32, mask: np.ndarray | None = None
) -> float:
    """Studholme's NMI, (H(A) + H(B)) / H(A, B), from a `bins` x `bins` joint histogram (1 to 2)."""
    a, b = _pair(first, second, mask)
    joint, _, _ = np.histogram2d(a, b, bins=bins)
    joint = joint / joint.sum()

    def entropy(probabilities: np.ndarray) -> float:
        nonzero = probabilities[probabilities > 0]
        return float(-(nonzero * np.log(nonzero)).sum())

    joint_entropy = entropy(joint)
    if joint_entropy == 0:
        return float("nan")
    return (entropy(joint.sum(1)) + entropy(joint.sum(0))) / joint_entropy
