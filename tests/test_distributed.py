"""Two CPU processes (gloo) train fastlora layers under DDP and FSDP2; gradients equal one process's."""

import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from tolerance import assert_close

import fastlora

WORLD = 2
BATCH, K, H, N = 8, 24, 40, 12
STEPS = 2
LR = 0.1
TIMEOUT_S = 90


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(fastlora.Linear(K, H, r=4, alpha=8), nn.GELU(), fastlora.Linear(H, N, r=2, alpha=4))
    for layer in model[::2]:
        nn.init.normal_(layer.lora_B)
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, K, generator=g), torch.randn(STEPS, BATCH, N, generator=g)


def train(model, xs, ys, *, scale=1.0):
    """STEPS of SGD on mean squared error; returns the LoRA grads of every step (name -> list of tensors)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=LR)
    grads = {n: [] for n in params}
    for x, y in zip(xs, ys, strict=True):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).sum() / (BATCH * N) * scale
        loss.backward()
        for n, p in params.items():
            g = p.grad
            grads[n].append((g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone())
        opt.step()
    return grads


def _worker(rank, port, mode, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert fastlora._launch.INTERPRET or torch.cuda.is_available(), "workers must run the kernels (interpreter)"
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        model = make_model()
        xs, ys = data()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        if mode == "ddp":
            model = nn.parallel.DistributedDataParallel(model)
            prefix = "module."
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model[::2]:
                fully_shard(layer)
            fully_shard(model)
            prefix = ""
        # each rank's loss is its half of the global mean; DDP/FSDP average the grads over ranks, hence * WORLD
        grads = train(model, xs[:, shard], ys[:, shard], scale=WORLD)
        if rank == 0:
            torch.save({n.removeprefix(prefix): g for n, g in grads.items()}, out_path)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    # Skip teardown: torch 2.13 can deadlock destroying a gloo group (the main thread joins gloo's worker while
    # holding the GIL, and the worker needs the GIL to free its last work item); seen once in ~10 runs.
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp2_available():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.parametrize("mode", [
    "ddp",
    pytest.param("fsdp2", marks=pytest.mark.skipif(not _fsdp2_available(), reason="needs fully_shard and gloo")),
])
def test_two_processes_match_one(mode, tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "grads.pt"
    procs = mp.spawn(_worker, args=(_free_port(), mode, str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"{mode} workers did not finish in {TIMEOUT_S} s")
    got = torch.load(out)
    expected = train(make_model(), *data())
    assert got.keys() == expected.keys() and len(got) == 4
    for name in expected:
        for step in range(STEPS):
            assert_close(got[name][step], expected[name][step], torch.float32, f"{mode} {name} step {step}")
