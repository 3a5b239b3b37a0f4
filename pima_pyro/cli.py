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
        "epochs": 12,
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


def _fit_command(args: argparse.Namespace) -> dict[str, object]:
    """``pima-pyro fit CONFIG.toml``: model file, ArviZ NetCDF, metrics JSON and plots."""
    from pima_pyro import PIMA
    from pima_pyro.config import load_config, modality_spec, read_data
    from pima_pyro.metrics import matched_accuracy
    from pima_pyro.plots import plot_loss

    config = load_config(args.config)
    data = read_data(config)
    specs = {name: modality_spec(name, t) for name, t in config["modalities"].items()}
    model = PIMA(specs, **config.get("model", {}))
    history = model.fit(data, **{"progress": not args.no_progress, **config.get("fit", {})})
    out = Path(config["output"]["dir"])
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.pt")
    tree = model.to_datatree(
        data,
        num_samples=int(config["output"].get("num_samples", 200)),
        ppc_samples=int(config["output"].get("ppc_samples", 50)),
    )
    tree.to_netcdf(out / "arviz.nc", engine="h5netcdf")
    plot_loss(history, out / "loss.png")
    clusters = model.predict_clusters(data)
    metrics: dict[str, object] = {
        "n_samples": data.n_samples,
        "final_loss": history.loss[-1],
        "cluster_sizes": np.bincount(clusters, minlength=model.n_clusters).tolist(),
        "weights": model.mixture_parameters()["weights"].round(4).tolist(),
        "outputs": [str(out / n) for n in ("model.pt", "arviz.nc", "loss.png", "metrics.json")],
    }
    if data.labels is not None:
        metrics["joint_accuracy"] = round(matched_accuracy(data.labels.numpy(), clusters)[0], 4)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _predict_command(args: argparse.Namespace) -> dict[str, object]:
    """``pima-pyro predict MODEL DATA --given A B --target C``: mean and interval to NetCDF."""
    import xarray as xr

    from pima_pyro import PIMA
    from pima_pyro.io import from_xarray, read_dataset

    model = PIMA.load(args.model)
    physics = {n: f"{n}_t" for n, s in model.specs.items() if s.kind == "physics"}
    dataset = read_dataset(args.data)
    physics = {n: c for n, c in physics.items() if n in dataset.data_vars}
    data = from_xarray(dataset, sample_dim=args.sample_dim, physics=physics, labels=None)
    pred = model.predict(data, given=args.given, target=args.target, interval=args.interval)
    dims = [args.sample_dim] + [f"{args.target}_dim_{i}" for i in range(pred.mean.ndim - 1)]
    result = xr.Dataset(
        {
            f"{args.target}_mean": (dims, pred.mean.numpy()),
            f"{args.target}_lower": (dims, pred.lower.numpy()),
            f"{args.target}_upper": (dims, pred.upper.numpy()),
            "cluster": ([args.sample_dim], model.predict_clusters(data, given=args.given)),
        },
        attrs={"given": ",".join(args.given), "interval": args.interval},
    )
    result.to_netcdf(args.out, engine="h5netcdf")
    return {"out": str(args.out), "n_samples": data.n_samples, "target": args.target}


def _inspect_command(args: argparse.Namespace) -> dict[str, object]:
    """``pima-pyro inspect MODEL``: specs, clusters and physics parameters as JSON."""
    from pima_pyro import PIMA
    from pima_pyro.files import spec_to_data

    model = PIMA.load(args.model)
    mixture = model.mixture_parameters()
    return {
        "specs": {n: spec_to_data(n, s) for n, s in model.specs.items()},
        "n_clusters": model.n_clusters,
        "latent_dim": model.latent_dim,
        "weights": mixture["weights"].round(4).tolist(),
        "active": mixture["active"].tolist(),
        "physics": {
            name: {
                "param_names": list(p["param_names"]),
                "theta": np.round(p["theta"], 5).tolist(),
                "noise_scale": np.round(p["noise_scale"], 5).tolist(),
            }
            for name, p in model.physics_parameters().items()
        },
    }


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


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    fit = sub.add_parser("fit", help="fit the run described by a TOML config (docs: config)")
    fit.add_argument("config", help="the TOML file")
    fit.add_argument("--no-progress", action="store_true")
    predict = sub.add_parser("predict", help="predict a modality from others, to NetCDF")
    predict.add_argument("model")
    predict.add_argument("data", help="NetCDF or Zarr in the layout of pima_pyro.io")
    predict.add_argument("--given", nargs="+", required=True)
    predict.add_argument("--target", required=True)
    predict.add_argument("--interval", type=float, default=0.9)
    predict.add_argument("--sample-dim", default="sample")
    predict.add_argument("--out", default="predictions.nc")
    inspect = sub.add_parser("inspect", help="print a model file's specs and parameters")
    inspect.add_argument("model")


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
    _add_run_commands(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        check_demo_arguments(parser, args)
    commands = {"demo": _demo, "fit": _fit_command, "predict": _predict_command,
                "inspect": _inspect_command}  # fmt: skip
    try:
        result = commands[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as exc:  # a user's mistake: no trace
        parser.exit(2, f"pima-pyro: error: {exc}\n")
    np.set_printoptions(precision=3)
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
