"""Overlap of label maps: Dice and Jaccard per label."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def _label_set(fixed: np.ndarray, moving: np.ndarray, labels: Iterable[int] | None) -> list[int]:
    if fixed.shape != moving.shape:
        raise ValueError(f"label maps differ in shape: {fixed.shape} vs {moving.shape}")
    if labels is None:
        present = np.union1d(np.unique(fixed), np.unique(moving))
        labels = [int(label) for label in present if label != 0]
    labels = [int(label) for label in labels]
    if not labels:
        raise ValueError("no labels to compare: both label maps are empty")
    return labels


def dice(
    fixed: np.ndarray, moving: np.ndarray, labels: Iterable[int] | None = None
) -> dict[int, float]:
    """Dice 2|A∩B| / (|A|+|B|) per label (default: every non-zero label present in either map)."""
    result = {}
    for label in _label_set(fixed, moving, labels):
        a, b = fixed == label, moving == label
        total = int(a.sum()) + int(b.sum())
        result[label] = 2.0 * int(np.logical_and(a, b).sum()) / total if total else float("nan")
    return result


def mask_dice(first: np.ndarray, second: np.ndarray) -> float:
    """Dice of two binary masks (non-zero is inside), e.g. a brain mask against the true one."""
    return dice((np.asarray(first) != 0).astype(np.int8), (np.asarray(second) != 0).astype(np.int8),
                labels=[1])[1]


def jaccard(
    fixed: np.ndarray, moving: np.ndarray, labels: Iterable[int] | None = None
) -> dict[int, float]:
    """Jaccard |A∩B| / |A∪B| per label (default: every non-zero label present in either map)."""
    result = {}
    for label in _label_set(fixed, moving, labels):
        a, b = fixed == label, moving == label
        union = int(np.logical_or(a, b).sum())
        result[label] = int(np.logical_and(a, b).sum()) / union if union else float("nan")
    return result


def mean_over_labels(scores: dict[int, float]) -> float:
    """Mean of per-label scores, ignoring labels absent from both maps (NaN)."""
    values = [value for value in scores.values() if value == value]
    return float(np.mean(values)) if values else float("nan")
