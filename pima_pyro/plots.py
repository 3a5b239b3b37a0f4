"""Figures: loss curves, latent scatter coloured by cluster, per-cluster physics fits."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pima_pyro.inference.svi import History  # noqa: E402


def plot_loss(history: History, path: str | os.PathLike[str]) -> None:
    """Negative ELBO per sample against epoch."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    epochs = np.arange(1, len(history.loss) + 1)
    ax.plot(epochs, history.loss, lw=1.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO per sample")
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_latent(
    latent: np.ndarray,
    clusters: np.ndarray,
    path: str | os.PathLike[str],
    title: str = "latent means coloured by cluster",
    cluster_means: np.ndarray | None = None,
) -> None:
    """Scatter of the first two principal directions of the latent means."""
    centred = latent - latent.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    basis = vt[:2].T if latent.shape[1] >= 2 else np.eye(latent.shape[1], 2)
    xy = centred @ basis
    fig, ax = plt.subplots(figsize=(5, 4.5))
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=clusters, cmap="tab10", s=6, alpha=0.7)
    if cluster_means is not None:
        mxy = (cluster_means - latent.mean(0)) @ basis
        ax.scatter(mxy[:, 0], mxy[:, 1], c="k", marker="x", s=60, label="mixture means")
        ax.legend(loc="best", fontsize=8)
    fig.colorbar(sc, ax=ax, label="cluster")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_physics_fits(
    grid: np.ndarray,
    curves: np.ndarray,
    clusters: np.ndarray,
    cluster_curves: np.ndarray,
    path: str | os.PathLike[str],
) -> None:
    """Observed curves (thin, coloured by assigned cluster) under each cluster's expert curve."""
    fig, ax = plt.subplots(figsize=(5, 4))
    cmap = plt.get_cmap("tab10")
    for n in range(min(len(curves), 300)):
        ax.plot(grid, curves[n], color=cmap(clusters[n] % 10), lw=0.3, alpha=0.4)
    for c, curve in enumerate(cluster_curves):
        ax.plot(grid, curve, color=cmap(c % 10), lw=2.5)
    ax.set_xlabel("t")
    ax.set_ylabel("y")
    ax.set_title("per-cluster physics experts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
