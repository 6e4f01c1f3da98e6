"""Two CPU processes (gloo) train fastlora layers (LoRA, dense DoRA, GroupedLinear with ragged ranks) under DDP and
FSDP2; gradients equal one process's. ``spawn``/``init_worker`` serve the other multi-process tests."""

import contextlib
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


KINDS = ("lora", "dora", "grouped")
# adapter ids of the BATCH samples (-1: the base alone); ranks per GroupedLinear: ragged, one empty slot
IDS = torch.tensor([0, 2, -1, 1, 2, 0, 1, -1])
RANKS = ([2, 8, 0], [4, 1, 3])


def make_model(kind="lora"):
    torch.manual_seed(0)
    if kind == "grouped":
        model = nn.Sequential(fastlora.GroupedLinear(K, H, ranks=RANKS[0], alpha=8), nn.GELU(),
                              fastlora.GroupedLinear(H, N, ranks=RANKS[1], alpha=4))
        for layer in model[::2]:
            for g, r in enumerate(layer.ranks):  # B's used columns random, the padding past each rank zero
                c0 = int(layer.rank_offsets[g])
                nn.init.normal_(layer.lora_B.data[:, c0:c0 + r])
        return model
    dora = kind == "dora"
    model = nn.Sequential(fastlora.Linear(K, H, r=4, alpha=8, use_dora=dora), nn.GELU(),
                          fastlora.Linear(H, N, r=2, alpha=4, use_dora=dora))
    for layer in model[::2]:
        nn.init.normal_(layer.lora_B)
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, K, generator=g), torch.randn(STEPS, BATCH, N, generator=g)


def train(model, xs, ys, *, scale=1.0, ids=None):
    """STEPS of SGD on mean squared error; returns the LoRA grads of every step (name -> list of tensors).
    ``ids``: the samples' adapters, for GroupedLinear models (``fastlora.use_adapters``)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(params.values(), lr=LR)
    grads = {n: [] for n in params}
    for x, y in zip(xs, ys, strict=True):
        opt.zero_grad()
        with fastlora.use_adapters(model, ids) if ids is not None else contextlib.nullcontext():
            loss = ((model(x) - y) ** 2).sum() / (BATCH * N) * scale
        loss.backward()
        for n, p in params.items():
            g = p.grad
            grads[n].append((g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone())
        opt.step()
    return grads


def _worker(rank, port, mode, kind, out_path):
    init_worker(rank, port)
    model = make_model(kind)
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
    grads = train(model, xs[:, shard], ys[:, shard], scale=WORLD, ids=IDS[shard] if kind == "grouped" else None)
    if rank == 0:
        torch.save({n.removeprefix(prefix): g for n, g in grads.items()}, out_path)


def init_worker(rank, port, world=WORLD):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    assert fastlora._launch.INTERPRET or torch.cuda.is_available(), "workers must run the kernels (interpreter)"
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _run(rank, worker, args):
    try:
        worker(rank, *args)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    # Skip teardown: torch 2.13 can deadlock destroying a gloo group (the main thread joins gloo's worker while
    # holding the GIL, and the worker needs the GIL to free its last work item); seen once in ~10 runs.
    os._exit(0)


def spawn(worker, *args, timeout=TIMEOUT_S, nprocs=WORLD):
    """Run ``worker(rank, port, *args)`` in ``nprocs`` processes (``init_worker`` sets up gloo); fail the test if
    one raises or they pass ``timeout`` seconds."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    procs = mp.spawn(_run, args=(worker, (_free_port(), *args)), nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not procs.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{worker.__name__} workers did not finish in {timeout} s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp2_available():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", [
    "ddp",
    pytest.param("fsdp2", marks=pytest.mark.skipif(not fsdp2_available(), reason="needs fully_shard and gloo")),
])
def test_two_processes_match_one(mode, kind, tmp_path):
    out = tmp_path / "grads.pt"
    spawn(_worker, mode, kind, str(out))
    got = torch.load(out)
    expected = train(make_model(kind), *data(), ids=IDS if kind == "grouped" else None)
    assert got.keys() == expected.keys() and len(got) == (6 if kind == "dora" else 4)
    for name in expected:
        for step in range(STEPS):
            assert_close(got[name][step], expected[name][step], torch.float32, f"{mode} {kind} {name} step {step}")
