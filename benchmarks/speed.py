"""Speed of a training step, scaling, memory and time-to-accuracy, in one process.

Usage::

    python benchmarks/speed.py [--quick] [--device cpu|cuda] [--budget SECONDS] [--mnist DIR]

Also the training engine's own cost: the time per step of ``PIMA.fit`` (the Lightning loop)
over a hand-written loop that does the same step (``lightning_over_bare``), on digits at batch
128 and, with ``--mnist``, on the MNIST demo's networks at batch 256.

Compares, on the same networks (pima-pyro's default MLPs) and the same minibatches:
(a) our step: ``TraceEnum_ELBO`` + Adam, (b) the same with ``JitTraceEnum_ELBO``, (c) the
reference PIMA loss (``benchmarks/reference_loss.py``) in float64 and (d) in float32, at batch
sizes 128 and 1024 on ``digits_affine`` and on a synthetic 50,000-sample copy of it; the scaling
exponent of our step time in batch size (64..1024) and in K (5, 10, 20, 40); peak RSS; and wall
time until joint accuracy first reaches 0.95 for our ``fit`` and for the reference algorithm at
its own settings (lr 2e-5, float64, batch 100) and at its best learning rate, each under
``--budget`` seconds. Prints a Markdown table, then, as its LAST line, a JSON object.
Intra-op threads: 1 (``--threads``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_loss import reference_loss, train_reference  # noqa: E402

from pima_pyro import PIMA, MultimodalData  # noqa: E402
from pima_pyro.datasets import affine_modalities, digits_affine, mnist_affine  # noqa: E402
from pima_pyro.inference.svi import minibatch, per_sample_loss  # noqa: E402
from pima_pyro.metrics import matched_accuracy  # noqa: E402
from pima_pyro.models.module import PIMAModule  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _module(data: MultimodalData, k: int, device: torch.device) -> PIMAModule:
    model = PIMA(affine_modalities(), n_clusters=k, latent_dim=4)
    net = model._build(data)
    return net.to(device)


def time_steps(step, batches, device, warmup: int = 5) -> float:
    """Median seconds per step over ``batches`` (after ``warmup`` untimed steps)."""
    for b in batches[:warmup]:
        step(b)
    _sync(device)
    times = []
    for b in batches[warmup:]:
        start = time.perf_counter()
        step(b)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_batches(data, batch_size, count, device, dtype, seed=0):
    full = data.to_batch(device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(count):
        idx = torch.randperm(full.n_total, device=device, generator=gen)[:batch_size]
        out.append(minibatch(full, idx, True, gen))
    return out


def ours_step(net, n_total, jit):
    loss_fn = per_sample_loss(net, n_total, jit)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step(batch):
        loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def reference_step(net):
    opt = torch.optim.Adam(net.parameters(), lr=2e-5)

    def step(batch):
        loss, _ = reference_loss(net, batch.values, batch.observed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def step_times(data, batch_size, device, steps, k=10):
    net = _module(data, k, device)
    out = {}
    f32 = make_batches(data, batch_size, steps, device, torch.float32)
    out["svi"] = time_steps(ours_step(copy.deepcopy(net), data.n_samples, False), f32, device)
    out["svi_jit"] = time_steps(ours_step(copy.deepcopy(net), data.n_samples, True), f32, device)
    out["torch_f32"] = time_steps(reference_step(copy.deepcopy(net)), f32, device)
    f64 = make_batches(data, batch_size, steps, device, torch.float64)
    out["torch_f64"] = time_steps(reference_step(copy.deepcopy(net).double()), f64, device)
    return out


def bare_loop_seconds_per_step(net, data, batch_size, device, epochs: int) -> float:
    """Seconds per step of a hand-written loop doing what the pre-Lightning loop did per epoch
    and step (a snapshot of the parameters and optimiser for the non-finite replay, the step
    draws, the JIT loss, backward, clipping, Adam, on-device loss and non-finite tracking, one
    host sync per epoch), over ``epochs`` epochs after one untimed epoch."""
    full = data.to_batch(device=device, dtype=torch.float32)
    loss_fn = per_sample_loss(net, full.n_total, jit=True)
    params = list(net.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    n_batches = full.n_total // batch_size
    gen = torch.Generator(device=device)
    times = []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        snapshot = (copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict()))
        total = torch.zeros((), device=device)
        first_bad = torch.full((), -1, device=device, dtype=torch.long)
        perm = torch.randperm(full.n_total, device=device, generator=gen.manual_seed(epoch))
        for b in range(n_batches):
            gen.manual_seed(1000 * epoch + b)
            batch = minibatch(full, perm[b * batch_size : (b + 1) * batch_size], True, gen, 4)
            loss = loss_fn(batch)
            net.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 100.0)
            opt.step()
            loss = loss.detach()
            bad = (~torch.isfinite(loss)) & (first_bad < 0)
            first_bad = torch.where(bad, torch.full_like(first_bad, b), first_bad)
            total = total + loss
        float(total), int(first_bad), snapshot  # the one host sync of the epoch
        _sync(device)
        times.append((time.perf_counter() - start) / n_batches)
    return statistics.median(times[1:])


def lightning_overhead(data, batch_size, device, epochs: int, repeats: int = 3, **kwargs) -> dict:
    """Seconds per step of ``PIMA.fit`` (the Lightning loop; median epoch time / steps) next
    to :func:`bare_loop_seconds_per_step` on the same networks, batch size and device; the
    two alternate ``repeats`` times and the medians are compared (2 shared cores are noisy)."""
    model = PIMA(affine_modalities(**kwargs), n_clusters=10, latent_dim=4)
    torch.manual_seed(0)
    net = model._build(data)
    bare, lightning = [], []
    for _ in range(repeats):
        bare.append(
            bare_loop_seconds_per_step(copy.deepcopy(net), data, batch_size, device, epochs)
        )
        model.module = copy.deepcopy(net)
        history = model.fit(
            data, epochs=epochs + 1, batch_size=batch_size, device=str(device), progress=False,
            logger=False, anchor_epochs=0, em_starts=1,
        )  # fmt: skip
        lightning.append(statistics.median(history.seconds[1:]) / (data.n_samples // batch_size))
    bare_s, lightning_s = statistics.median(bare), statistics.median(lightning)
    return {
        "lightning_ms_per_step": round(1e3 * lightning_s, 3),
        "bare_loop_ms_per_step": round(1e3 * bare_s, 3),
        "lightning_over_bare": round(lightning_s / bare_s, 3),
    }


def exponent(xs, ys) -> float:
    slope, _ = np.polyfit(np.log(xs), np.log(ys), 1)
    return float(slope)


def scale_to(data: MultimodalData, n: int, seed: int = 0) -> MultimodalData:
    """A synthetic set of n samples: images resampled with pixel noise, curves re-simulated."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, data.n_samples, n)
    images = data.values["image"].numpy()[idx] + rng.normal(0, 0.05, (n, 8, 8)).astype(np.float32)
    labels = data.labels.numpy()[idx]
    t = data.grids["curve"].numpy()
    curves = labels[:, None] * t + rng.normal(0, 0.5, (n, t.size))
    return MultimodalData(
        {"image": np.clip(images, 0, 1), "curve": curves}, grids={"curve": t}, labels=labels
    )


def gradient_variance(data, device, objective: str, draws: int = 50) -> float:
    """Sum over encoder/decoder coordinates of the gradient variance across ``draws``
    evaluations of the objective on one fixed batch (same parameters, fresh z draws)."""
    net = _module(data, 10, device)
    full = data.to_batch(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    batch = minibatch(full, torch.arange(128, device=device), False, gen)
    if objective == "elbo":
        loss_fn = per_sample_loss(net, full.n_total)
    else:
        from pima_pyro.inference.closed_form import closed_form_loss

        def loss_fn(b):
            return closed_form_loss(net, b)

    grads = []
    for _ in range(draws):
        net.zero_grad(set_to_none=True)
        loss_fn(batch).backward()
        grads.append(
            torch.cat(
                [
                    p.grad.flatten()
                    for n, p in net.named_parameters()
                    if p.grad is not None and ("encoder" in n or "decoder" in n)
                ]
            )
        )
    return float(torch.stack(grads).var(0).sum())


def time_to_accuracy_ours(data, device, budget, target=0.95, epochs=200, **fit_kwargs):
    start = time.perf_counter()
    reached = {"seconds": None, "accuracy": None}
    model = PIMA(affine_modalities(), n_clusters=10, latent_dim=4)

    class Reached(Exception):
        pass

    def callback(epoch, loss):
        acc, _ = matched_accuracy(data.labels.numpy(), model.predict_clusters(data))
        reached["accuracy"] = acc
        if acc >= target:
            reached["seconds"] = time.perf_counter() - start
            raise Reached
        if time.perf_counter() - start > budget:
            raise Reached

    try:
        model.fit(
            data, epochs=epochs, device=device, progress=False, callback=callback, **fit_kwargs
        )
    except Reached:
        pass
    return reached


def mnist_time_to_accuracy(root, device, budget: float) -> dict:
    """Seconds to 0.95 joint accuracy on the 60,000 MNIST training pairs: ours vs the reference
    at its own settings (lr 2e-5, float64, batch 100) under ``budget`` seconds."""
    train = mnist_affine(root, "train")
    ours = time_to_accuracy_ours(train, device, budget, epochs=20)
    ref = train_reference(
        _module(train, 10, torch.device("cpu")), train, budget_seconds=budget, eval_every_seconds=30
    )
    ours_s = ours["seconds"]
    ref_s = ref["reached_seconds"]
    return {
        "ours_seconds_to_0.95": None if ours_s is None else round(ours_s, 2),
        "reference_reached_seconds": ref_s,
        "reference_accuracy_at_budget": round(ref["final_accuracy"], 4),
        "reference_epochs_completed": ref["epochs"],
        "budget_seconds": budget,
        "ratio_reference_over_ours": None
        if not ours_s
        else round((ref_s if ref_s is not None else budget) / ours_s, 1),
        "ratio_is_lower_bound": ref_s is None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=900.0, help="reference wall budget (s)")
    parser.add_argument("--mnist", default=None, help="MNIST IDX folder for time-to-accuracy")
    parser.add_argument(
        "--mnist-only", action="store_true", help="with --mnist: only the MNIST time-to-accuracy"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.mnist_only:
        if not args.mnist:
            parser.error("--mnist-only needs --mnist DIR")
        print(json.dumps({"mnist": mnist_time_to_accuracy(args.mnist, device, args.budget)}))
        return
    steps = 25 if args.quick else 60
    digits = digits_affine(seed=0)
    rows, result = [], {}
    sets = {"digits (1,797)": digits}
    if not args.quick:
        sets["synthetic (50,000)"] = scale_to(digits, 50_000)
    for set_name, data in sets.items():
        for bs in (128, 1024):
            t = step_times(data, bs, device, steps)
            rows.append((set_name, bs, t))
            if set_name.startswith("digits") and bs == 128:
                # our default step is the JIT one; the plain TraceEnum_ELBO step is the "before"
                result["svi_step_over_torch_f32"] = round(t["svi_jit"] / t["torch_f32"], 3)
                result["svi_step_over_torch_f32_without_jit"] = round(t["svi"] / t["torch_f32"], 3)
                result["jit_speedup"] = round(t["svi"] / t["svi_jit"], 3)
                result["step_ms_batch128"] = {k: round(1e3 * v, 3) for k, v in t.items()}
    overhead = lightning_overhead(digits, 128, device, epochs=10 if args.quick else 30)
    result["lightning_loop"] = overhead
    # the engine's step, not the bare JIT step, is what a user's fit pays
    result["fit_step_over_torch_f32"] = round(
        overhead["lightning_ms_per_step"] / result["step_ms_batch128"]["torch_f32"], 3
    )
    if args.mnist:
        train = mnist_affine(args.mnist, "train").subset(np.arange(12_000))
        result["lightning_loop_mnist_networks"] = lightning_overhead(
            train, 256, device, epochs=3, repeats=2, image_scale=1.0
        )
    batch_sizes = [64, 128, 256, 512, 1024]
    bs_times = []
    for bs in batch_sizes:
        net = _module(digits, 10, device)
        bs_times.append(
            time_steps(
                ours_step(net, digits.n_samples, False),
                make_batches(digits, bs, steps, device, torch.float32),
                device,
            )
        )
    ks = [5, 10, 20, 40]
    k_times = []
    for k in ks:
        net = _module(digits, k, device)
        k_times.append(
            time_steps(
                ours_step(net, digits.n_samples, False),
                make_batches(digits, 128, steps, device, torch.float32),
                device,
            )
        )
    result["batch_size_exponent"] = round(exponent(batch_sizes, bs_times), 3)
    result["k_exponent"] = round(exponent(ks, k_times), 3)
    result["step_ms_by_batch"] = dict(
        zip(batch_sizes, [round(1e3 * t, 3) for t in bs_times], strict=True)
    )
    result["step_ms_by_k"] = dict(zip(ks, [round(1e3 * t, 3) for t in k_times], strict=True))

    # time to 0.95 joint accuracy
    budget = 60.0 if args.quick else args.budget
    ours = time_to_accuracy_ours(digits, device, budget)
    ref_own = train_reference(
        _module(digits, 10, torch.device("cpu")), digits, budget_seconds=budget
    )
    best = {"lr": 2e-5, "trace": ref_own}
    for lr in (2e-4, 2e-3, 1e-2):
        trace = train_reference(
            _module(digits, 10, torch.device("cpu")), digits, lr=lr, budget_seconds=budget / 3
        )
        better = (trace["reached_seconds"] or math.inf) < (
            best["trace"]["reached_seconds"] or math.inf
        )
        if better or (
            best["trace"]["reached_seconds"] is None
            and trace["final_accuracy"] > best["trace"]["final_accuracy"]
        ):
            best = {"lr": lr, "trace": trace}
    closed = time_to_accuracy_ours(digits, device, budget, objective="closed_form")
    result["closed_form"] = {
        "seconds_to_0.95": None if closed["seconds"] is None else round(closed["seconds"], 2),
        "gradient_variance_elbo": gradient_variance(digits, device, "elbo"),
        "gradient_variance_closed_form": gradient_variance(digits, device, "closed_form"),
    }
    result["closed_form"]["variance_ratio_closed_over_elbo"] = round(
        result["closed_form"]["gradient_variance_closed_form"]
        / result["closed_form"]["gradient_variance_elbo"],
        3,
    )
    ours_s = ours["seconds"]
    own_s = ref_own["reached_seconds"]
    result["ours_seconds_to_0.95"] = None if ours_s is None else round(ours_s, 2)
    result["reference_own_settings"] = {
        "reached_seconds": own_s,
        "accuracy_at_budget": round(ref_own["final_accuracy"], 4),
        "budget_seconds": budget,
    }
    result["time_to_acc_ratio_reference_over_ours"] = (
        round((own_s if own_s is not None else budget) / ours_s, 1) if ours_s else None
    )
    result["time_to_acc_ratio_is_lower_bound"] = own_s is None
    best_s = best["trace"]["reached_seconds"]
    result["reference_best_lr"] = {
        "lr": best["lr"],
        "reached_seconds": best_s,
        "accuracy_at_budget": round(best["trace"]["final_accuracy"], 4),
        "ratio_over_ours": round((best_s if best_s is not None else budget / 3) / ours_s, 1)
        if ours_s
        else None,
        "ratio_is_lower_bound": best_s is None,
    }
    if args.mnist:
        train = mnist_affine(args.mnist, "train")
        ours_m = time_to_accuracy_ours(train, device, budget, epochs=20)
        ref_m = train_reference(
            _module(train, 10, torch.device("cpu")), train, budget_seconds=budget
        )
        result["mnist"] = {
            "ours_seconds_to_0.95": ours_m["seconds"],
            "reference_reached_seconds": ref_m["reached_seconds"],
            "reference_accuracy_at_budget": round(ref_m["final_accuracy"], 4),
        }
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["device"] = str(device)
    result["threads"] = args.threads

    print("| data | batch | SVI (ms) | SVI JIT (ms) | torch f32 (ms) | torch f64 (ms) |")
    print("|---|---|---|---|---|---|")
    for set_name, bs, t in rows:
        print(
            f"| {set_name} | {bs} | {1e3 * t['svi']:.2f} | {1e3 * t['svi_jit']:.2f} | "
            f"{1e3 * t['torch_f32']:.2f} | {1e3 * t['torch_f64']:.2f} |"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
