"""How fast the image encoder learns on MNIST (issue 13): image-only test accuracy after every
epoch against the fit time spent so far (the EM start included, the evaluation excluded).

Usage::

    python benchmarks/mnist_learning_curve.py --data-root ../shared/data/mnist [--epochs 12]
        [--cross-modal-weight 1.0] [--seed 0]

The demo's settings (batch 256, lr 2e-3, latent 8, pixel scale 1.0, MLP), 1 thread. One line
per epoch, then a JSON line with the whole curve and the first fit time at which image-only
accuracy reached 0.96.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from pima_pyro import PIMA
from pima_pyro.datasets import affine_modalities, mnist_affine
from pima_pyro.metrics import matched_accuracy


class Curve:
    """Per-epoch callback: the fit's clock stops while the test accuracy is measured."""

    def __init__(self, model: PIMA, test) -> None:
        self.model, self.test = model, test
        self.fit_seconds, self.rows = 0.0, []
        self.mark = time.perf_counter()

    def __call__(self, epoch: int, loss: float) -> None:
        self.fit_seconds += time.perf_counter() - self.mark
        posterior = self.model.cluster_posterior(self.test, given=["image"])
        accuracy, _ = matched_accuracy(self.test.labels.numpy(), posterior.argmax(1))
        row = {"epoch": epoch, "fit_seconds": round(self.fit_seconds, 1), "image_only": accuracy}
        print(json.dumps(row), flush=True)
        self.rows.append(row)
        self.mark = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--cross-modal-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    train = mnist_affine(args.data_root, "train", seed=args.seed)
    test = mnist_affine(args.data_root, "test", seed=args.seed)
    model = PIMA(affine_modalities(image_scale=1.0, image_network="mlp"), 10, latent_dim=8)
    curve = Curve(model, test)
    curve.mark = time.perf_counter()
    model.fit(
        train,
        epochs=args.epochs,
        batch_size=256,
        lr=2e-3,
        seed=args.seed,
        progress=False,
        callback=curve,
        cross_modal_weight=args.cross_modal_weight,
        logger=False,
    )
    reached = [r["fit_seconds"] for r in curve.rows if r["image_only"] >= 0.96]
    print(json.dumps({"curve": curve.rows, "seconds_to_0.96": reached[0] if reached else None}))


if __name__ == "__main__":
    main()
