"""docs/distributed.md's recipe (QLoRA with FSDP2, loaded straight into sharded 4-bit) under torchrun with 2 CPU
processes, against the same training in one process without FSDP2: the block is extracted from the doc and run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_distributed import fsdp2_available
from tolerance import assert_close

pytestmark = pytest.mark.skipif(not fsdp2_available(), reason="needs fully_shard and gloo")
DOC = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"
CONFIG = dict(dim=256, n_layers=1, n_heads=4, ffn=256, vocab=96)
STEPS = 2
TIMEOUT_S = 400


def recipe_source() -> str:
    text = DOC.read_text()
    marker = text.index("<!-- tested: tests/test_fsdp_recipe.py")
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, marker)
    assert match, "docs/distributed.md: no python block after the tested marker"
    return match.group(1)


def write_checkpoint(path, dim=256, n_layers=1, n_heads=4, ffn=256, vocab=96, seed=0):
    """A random Llama-style checkpoint in the recipe's layout: config.json and model.safetensors (bf16)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {"embed.weight": torch.randn(vocab, dim, generator=g),
               "norm.weight": 1 + 0.1 * torch.randn(dim, generator=g),
               "head.weight": torch.randn(vocab, dim, generator=g) / dim**0.5}
    shapes = dict(q=(dim, dim), k=(dim, dim), v=(dim, dim), o=(dim, dim), gate=(ffn, dim), up=(ffn, dim),
                  down=(dim, ffn))
    for i in range(n_layers):
        for norm in ("attn_norm", "mlp_norm"):
            tensors[f"layers.{i}.{norm}.weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
        for name, (out, k) in shapes.items():
            tensors[f"layers.{i}.{name}.weight"] = torch.randn(out, k, generator=g) / k**0.5
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}, f"{path}/model.safetensors")
    Path(path, "config.json").write_text(json.dumps(dict(dim=dim, n_layers=n_layers, n_heads=n_heads, ffn=ffn,
                                                         vocab=vocab)))


def one_process(recipe, ckpt):
    """The recipe's training without FSDP2: each projection ``Linear4bit.from_linear`` of its bf16 weight, the same
    adapter initialisation, optimizer and batches (whole). Returns (losses, {adapter key: tensor})."""
    from safetensors.torch import load_file

    from fastlora.linear4bit import Linear4bit

    ns = {"__name__": "recipe"}
    exec(compile(recipe, "fsdp_qlora.py", "exec"), ns)
    weights = load_file(f"{ckpt}/model.safetensors")
    model = ns["Model"](CONFIG)
    for name, m in list(model.named_modules()):
        if isinstance(m, Linear4bit):
            base = nn.Linear(m.in_features, m.out_features, bias=False, dtype=torch.bfloat16)
            base.weight.data.copy_(weights[f"{name}.weight"])
            new = Linear4bit.from_linear(base, r=m.r, alpha=m.alpha, quant_type=m.quant_type, blocksize=m.blocksize,
                                         double_quant=m.double_quant, compute_dtype=m.compute_dtype)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
    for name, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if not isinstance(m, Linear4bit):  # embedding, norms, head: frozen
                p.data.copy_(weights[f"{name}.{pname}" if name else pname])
                p.requires_grad_(False)
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, Linear4bit):
            m.lora_A.data.copy_(nn.init.kaiming_uniform_(torch.empty(m.lora_A.shape), a=5**0.5))
            m.lora_B.data.zero_()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        tokens = torch.randint(CONFIG["vocab"], (4, 17), generator=g)
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    adapters = {f"base_model.model.{n}.weight": p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return losses, adapters


def test_recipe_under_torchrun_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    recipe = recipe_source()
    script, ckpt, out = tmp_path / "fsdp_qlora.py", tmp_path / "ckpt", tmp_path / "adapter"
    script.write_text(recipe)
    ckpt.mkdir()
    write_checkpoint(ckpt, **CONFIG)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(ckpt), str(out), str(STEPS)]
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s")
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    memory = {line["rank"]: line for line in lines if "rank" in line}
    losses = [line["loss"] for line in sorted((line for line in lines if "step" in line), key=lambda x: x["step"])]
    assert sorted(memory) == [0, 1] and len(losses) == STEPS, run.stdout
    for rank, m in memory.items():  # dim 256, blocksize 64: units of 64 rows, every layer splits in two
        assert 2 * m["base_bytes_held"] == m["base_bytes_whole"], f"rank {rank}: {m}"

    expected_losses, expected = one_process(recipe, ckpt)
    got = load_file(out / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and not config["use_dora"]
    for step, (a, b) in enumerate(zip(losses, expected_losses, strict=True)):
        assert_close(torch.tensor(a), torch.tensor(b), torch.float32, f"loss step {step}")
    assert got.keys() == expected.keys() and len(got) == 14
    for key, value in expected.items():
        assert_close(got[key], value, torch.float32, key)
    assert any(got[k].abs().max() > 0 for k in got if "lora_B" in k), "the adapters did not train"
