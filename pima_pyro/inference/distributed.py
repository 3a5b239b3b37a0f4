r"""Data-parallel training on ``torch.distributed`` (gloo on CPU, nccl on CUDA).

Every process holds the whole model (Pyro's parameters live in the module, so nothing is
shared through the param store) and the whole data set; each epoch all processes draw the same
permutation, cut it into *global* batches of ``devices * batch_size`` samples, and process ``r``
takes the ``r``-th slice of each (the data are sharded, not plate-subsampled, so no two workers
see the same sample). The random modality subsets and the standard-normal draws of ``z`` are
drawn for the global batch from a generator seeded by ``(seed, epoch, step)`` and sliced the same
way (common random numbers), and the gradients are averaged with ``all_reduce``. A step on
``devices`` processes is therefore the step one process would take on the global batch, up to
floating-point summation order.

Local use: ``PIMA.fit(..., strategy="ddp", devices=N)`` spawns N processes on this machine.
Multi-node: start one process per device with ``torchrun`` (``MASTER_ADDR``/``MASTER_PORT``
set), call ``torch.distributed.init_process_group(backend, init_method="env://")`` and then
:func:`train_data_parallel` in each (docs/distributed.md).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile

import torch
import torch.distributed as torch_dist

from pima_pyro.data import Batch, MultimodalData
from pima_pyro.inference.svi import (
    History,
    forget_registered_parameters,
    initialize_from_physics,
    minibatch,
    per_sample_loss,
)
from pima_pyro.models.module import PIMAModule


def _global_batch(full: Batch, idx: torch.Tensor, gen: torch.Generator, latent_dim: int) -> Batch:
    """:func:`~pima_pyro.inference.svi.minibatch` plus the standard-normal draws of z."""
    batch = minibatch(full, idx, True, gen)
    dtype = next(iter(full.values.values())).dtype
    batch.noise = torch.randn(
        idx.shape[0], latent_dim, generator=gen, device=idx.device, dtype=dtype
    )
    return batch


def train_data_parallel(
    net: PIMAModule,
    data: MultimodalData,
    epochs: int,
    batch_size: int,
    lr: float = 5e-3,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    clip_norm: float | None = 100.0,
) -> History:
    """One process's share of data-parallel training (process group already initialised when
    ``world_size > 1``). ``batch_size`` is per process. ``net`` must start identical on every
    process (e.g. after :func:`~pima_pyro.inference.svi.initialize_from_physics`)."""
    device = torch.device(device)
    net.to(device).train()
    forget_registered_parameters()
    full = data.to_batch(device=device, dtype=net.mixture.loc.dtype)
    n = full.n_total
    global_size = batch_size * world_size
    if global_size > n:
        raise ValueError(
            f"fit(strategy='ddp'): devices * batch_size = {global_size} exceeds the {n} samples"
        )
    steps = n // global_size
    loss_fn = per_sample_loss(net, n, jit=False)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    history = History()
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    for epoch in range(epochs):
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, device=device, generator=gen)
        total = torch.zeros((), device=device, dtype=full.values[net.modality_names[0]].dtype)
        for step in range(steps):
            batch = _global_batch(
                full, perm[step * global_size : (step + 1) * global_size], gen, net.latent_dim
            )
            loss = loss_fn(batch.take(mine))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world_size > 1:
                for p in net.parameters():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    torch_dist.all_reduce(p.grad, op=torch_dist.ReduceOp.SUM)
                    p.grad.div_(world_size)
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip_norm)
            optimizer.step()
            total = total + loss.detach()
        value = total.clone()
        if world_size > 1:
            torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
            value = value / world_size
        history.loss.append(float(value) / steps)
        history.phase.append("full")
        history.seconds.append(math.nan)
    net.eval()
    return history


def _worker(rank: int, world_size: int, init_file: str, payload: dict, out_path: str) -> None:
    torch.set_num_threads(payload.get("threads", 1))
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        # torch.multiprocessing hands every process the SAME shared-memory parameters: copy them,
        # or the processes would step one set of weights concurrently
        net = copy.deepcopy(payload["net"])
        history = train_data_parallel(
            net,
            payload["data"],
            payload["epochs"],
            payload["batch_size"],
            payload["lr"],
            payload["seed"],
            rank,
            world_size,
        )
        if rank == 0:
            torch.save({"state_dict": net.state_dict(), "history": history.as_dict()}, out_path)
    finally:
        torch_dist.destroy_process_group()


def fit_data_parallel(
    net: PIMAModule,
    data: MultimodalData,
    devices: int,
    epochs: int,
    batch_size: int,
    lr: float = 5e-3,
    seed: int = 0,
    em_starts: int = 10,
    threads_per_process: int = 1,
) -> History:
    """Initialise (EM) here, train on ``devices`` local CPU processes (gloo), load the result
    into ``net``. With ``devices=1`` it trains in this process with the same batching."""
    if devices < 1:
        raise ValueError(f"fit(strategy='ddp'): devices must be >= 1, got {devices}")
    torch.manual_seed(seed)
    full = data.to_batch(dtype=net.mixture.loc.dtype)
    em_log_likelihood = None
    if net.physics_names:
        em_log_likelihood = initialize_from_physics(net, full, seed, em_starts).log_likelihood
    if devices == 1:
        history = train_data_parallel(net, data, epochs, batch_size, lr, seed)
    else:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            init_file = os.path.join(tmp, "rendezvous")
            out_path = os.path.join(tmp, "result.pt")
            payload = {
                "net": net,
                "data": data,
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "seed": seed,
                "threads": threads_per_process,
            }
            mp.spawn(
                _worker, args=(devices, init_file, payload, out_path), nprocs=devices, join=True
            )
            result = torch.load(out_path, weights_only=False)
        net.load_state_dict(result["state_dict"])
        net.eval()
        history = History.from_dict(result["history"])
    history.em_log_likelihood = em_log_likelihood
    return history
