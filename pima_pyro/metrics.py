"""Evaluation against known ground truth."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def matched_accuracy(labels: np.ndarray, clusters: np.ndarray) -> tuple[float, dict[int, int]]:
    """Accuracy after the best one-to-one relabelling of clusters (Hungarian algorithm).

    Returns the accuracy and the mapping ``cluster -> label`` that achieves it.
    """
    labels = np.asarray(labels, dtype=np.int64)
    clusters = np.asarray(clusters, dtype=np.int64)
    if labels.shape != clusters.shape or labels.ndim != 1:
        raise ValueError(
            f"matched_accuracy: labels and clusters must be equal-length 1-D arrays, got "
            f"{labels.shape} and {clusters.shape}"
        )
    size = int(max(labels.max(), clusters.max())) + 1
    counts = np.zeros((size, size), dtype=np.int64)
    np.add.at(counts, (clusters, labels), 1)
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / labels.size), dict(
        zip(rows.tolist(), cols.tolist(), strict=True)
    )


def relative_l2(prediction: np.ndarray, truth: np.ndarray) -> float:
    """:math:`\\lVert \\hat y - y \\rVert_F / \\lVert y \\rVert_F` over the whole array."""
    prediction = np.asarray(prediction, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    return float(np.linalg.norm(prediction - truth) / np.linalg.norm(truth))
