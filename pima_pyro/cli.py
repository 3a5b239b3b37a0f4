"""Command line: ``pima-pyro demo``.

``pima-pyro demo`` trains on the seed's toy (digit image + line of slope = digit), writes a loss
curve, a latent plot, the physics fits and the history to ``--out`` and prints, as its LAST
line, one JSON object of metrics against the known truth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

#: Per-data-set defaults of the demo (seen to meet the acceptance figures on 2 CPU cores).
DEMO_DEFAULTS: dict[str, dict[str, object]] = {
    "digits": {
        "epochs": 200,
        "batch_size": 128,
        "lr": 5e-3,
        "latent_dim": 4,
        "image_scale": 0.5,
        "image_network": "mlp",
    },
    "mnist": {
        "epochs": 50,
        "batch_size": 256,
        "lr": 2e-3,
        "latent_dim": 8,
        "image_scale": 1.0,
        "image_network": "mlp",
    },
}


def _demo(args: argparse.Namespace) -> dict[str, object]:
    from pima_pyro import PIMA
    from pima_pyro.datasets import affine_modalities, digits_affine, mnist_affine
    from pima_pyro.metrics import matched_accuracy, relative_l2
    from pima_pyro.plots import plot_latent, plot_loss, plot_physics_fits

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    cfg = dict(DEMO_DEFAULTS[args.dataset])
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    if args.dataset == "digits":
        data = digits_affine(noise_std=args.noise_std, seed=args.seed)
        train, test = data.train_test_split(0.3, seed=args.seed)
    else:
        if args.data_root is None:
            raise SystemExit("pima-pyro demo --dataset mnist needs --data-root DIR (IDX files)")
        train = mnist_affine(args.data_root, "train", noise_std=args.noise_std, seed=args.seed)
        test = mnist_affine(args.data_root, "test", noise_std=args.noise_std, seed=args.seed)
    model = PIMA(
        affine_modalities(image_scale=cfg["image_scale"], image_network=cfg["image_network"]),
        n_clusters=10,
        latent_dim=cfg["latent_dim"],
    )
    fit_start = time.perf_counter()
    history = model.fit(
        train,
        epochs=cfg["epochs"],
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
    )
    fit_seconds = time.perf_counter() - fit_start

    assert train.labels is not None and test.labels is not None
    joint = model.cluster_posterior(train).argmax(1)
    joint_acc, mapping = matched_accuracy(train.labels.numpy(), joint)
    image_acc, _ = matched_accuracy(
        test.labels.numpy(), model.cluster_posterior(test, given=["image"]).argmax(1)
    )
    curve_acc, _ = matched_accuracy(
        test.labels.numpy(), model.cluster_posterior(test, given=["curve"]).argmax(1)
    )
    slopes = model.physics_parameters()["curve"]["theta"][:, 0]
    slope_err = max(
        abs(float(slopes[c]) - label) for c, label in mapping.items() if c < len(slopes)
    )
    pred = model.predict(test, given=["image"], target="curve", num_samples=100, seed=args.seed)
    rel_l2 = relative_l2(pred.mean.numpy(), test.values["curve"].numpy())

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_loss(history, out / "loss.png")
    latent = model.get_latent_representation(test, given=["image"])
    plot_latent(
        latent,
        model.cluster_posterior(test, given=["image"]).argmax(1),
        out / "latent.png",
        title="test images: q(z | image), coloured by p(c | image)",
        cluster_means=model.mixture_parameters()["loc"],
    )
    net = model.module
    assert net is not None
    with torch.no_grad():
        cluster_curves = net.modalities["curve"].cluster_means().cpu().numpy()
    plot_physics_fits(
        train.grids["curve"].numpy(),
        train.values["curve"].numpy(),
        joint,
        cluster_curves,
        out / "physics_fits.png",
    )
    (out / "history.json").write_text(json.dumps(history.as_dict()))
    metrics = {
        "dataset": args.dataset,
        "seed": args.seed,
        "epochs": cfg["epochs"],
        "n_train": train.n_samples,
        "n_test": test.n_samples,
        "threads": args.threads,
        "device": str(model.device),
        "joint_accuracy": round(joint_acc, 4),
        "image_only_test_accuracy": round(image_acc, 4),
        "curve_only_test_accuracy": round(curve_acc, 4),
        "slope_max_abs_error": round(slope_err, 4),
        "recovered_slopes": [
            round(float(slopes[c]), 3) for c in sorted(mapping, key=mapping.get) if c < len(slopes)
        ],
        "curve_from_image_rel_l2": round(rel_l2, 4),
        "fit_seconds": round(fit_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def check_demo_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """argparse-style errors (exit status 2, no traceback) for arguments out of range."""
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.noise_std < 0:
        parser.error(f"--noise-std must be >= 0, got {args.noise_std}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out!r} is a file; give a folder")
    if args.dataset == "digits" and args.data_root is not None:
        parser.error("--data-root applies to --dataset mnist only (digits ship with scikit-learn)")
    if args.dataset == "mnist" and args.data_root is None:
        parser.error("--dataset mnist needs --data-root DIR (the IDX files)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pima-pyro", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train on the digit/line toy and report metrics")
    demo.add_argument("--dataset", choices=sorted(DEMO_DEFAULTS), default="digits")
    demo.add_argument("--data-root", default=None, help="folder with the MNIST IDX files")
    demo.add_argument("--epochs", type=int, default=None, help="default: per data set")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--noise-std", type=float, default=0.5)
    demo.add_argument("--device", default="auto")
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: small networks run fastest single-threaded)",
    )
    demo.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "demo":
        check_demo_arguments(parser, args)
        try:
            metrics = _demo(args)
        except (ValueError, TypeError, FileNotFoundError) as exc:  # a user's mistake: no trace
            parser.exit(2, f"pima-pyro: error: {exc}\n")
        np.set_printoptions(precision=3)
        sys.stdout.flush()
        print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
