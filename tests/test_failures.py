"""Failure behaviour: a failed load changes nothing, a failed save leaves the old adapter, 4-bit state dicts are
whole, prebuilt batches are checked, bad values are refused where they enter (docs/design.md, "Failure behaviour")."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from tiny import randomize_lora_B, tiny_llama, tokens

import fastlora
from fastlora import _files, adapters

pytest.importorskip("safetensors")


def snapshot(model):
    """Everything a failed call must leave as it was: module types, parameter identities, values and flags."""
    return {
        "modules": [(n, type(m).__name__, id(m)) for n, m in model.named_modules()],
        "params": [(n, id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()],
        "scaling": [(n, getattr(m, "scaling", None), getattr(m, "alpha", None)) for n, m in model.named_modules()],
    }


def assert_unchanged(before, after):
    assert before["modules"] == after["modules"]
    assert before["scaling"] == after["scaling"]
    assert len(before["params"]) == len(after["params"])
    for (n, i, g, v), (n2, i2, g2, v2) in zip(before["params"], after["params"], strict=True):
        assert (n, i, g) == (n2, i2, g2) and torch.equal(v, v2), n


def saved_adapter(path, **config_changes):
    """A tiny Llama adapter (q_proj, v_proj) saved by fastlora, its config then edited."""
    model = tiny_llama()
    fastlora.inject(model, ["q_proj", "v_proj"], r=4, alpha=8)
    randomize_lora_B(model)
    fastlora.save_adapter(model, path)
    config_file = os.path.join(path, adapters.CONFIG_NAME)
    with open(config_file) as f:
        config = json.load(f)
    config.update(config_changes)
    with open(config_file, "w") as f:
        json.dump(config, f)
    return model


LAST = "model.layers.1.self_attn.v_proj"


@pytest.mark.parametrize("target", ["plain", "fastlora"])
@pytest.mark.parametrize("change,match", [
    ({"alpha_pattern": {LAST: "16"}}, r"alpha_pattern\['model.layers.1.self_attn.v_proj'\] must be a number"),
    ({"lora_dropout": 1.5}, r"layer 'model.layers.0.self_attn.q_proj': dropout must be in \[0, 1\)"),
    ({"lora_alpha": "8"}, "lora_alpha must be a number; got '8'"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a number; got nan"),
], ids=["alpha-pattern-str", "dropout", "alpha-str", "alpha-nan"])
def test_failed_load_adapter_changes_nothing(tmp_path, change, match, target):
    saved_adapter(tmp_path / "ad", **change)
    model = tiny_llama()
    if target == "fastlora":  # a model with adapters already: a failed load must not touch them
        fastlora.inject(model, ["q_proj", "v_proj"], r=2, alpha=4)
        randomize_lora_B(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match) as info:
        fastlora.load_adapter(model, tmp_path / "ad")
    assert "adapter_config.json" in str(info.value)  # names the file
    assert_unchanged(before, snapshot(model))


def test_failed_load_with_a_bad_base_last_changes_nothing(tmp_path):
    """The last layer's base cannot take an adapter (a bitsandbytes Linear4bit not yet quantised)."""
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    fastlora.inject(model, ["q_proj", "v_proj"], r=4, alpha=8)
    fastlora.save_adapter(model, tmp_path / "ad")
    model = tiny_llama()
    model.model.layers[1].self_attn.v_proj = bnb.nn.Linear4bit(64, 32)  # quantised only on its first .to()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"'{LAST}': the bitsandbytes Linear4bit is not quantised yet"):
        fastlora.load_adapter(model, tmp_path / "ad")
    assert_unchanged(before, snapshot(model))


def test_failed_load_into_linear4bit_keeps_its_scaling(tmp_path):
    """A config with lora_alpha 32 and a bad dropout, loaded over fastlora.Linear4bit layers of alpha 8."""
    model = nn.Sequential(fastlora.Linear4bit(64, 32, r=4, alpha=8, compute_dtype=torch.float32))
    torch.nn.init.normal_(model[0].lora_B)
    fastlora.save_adapter(model, tmp_path / "ad")
    with open(tmp_path / "ad" / adapters.CONFIG_NAME) as f:
        config = json.load(f)
    with open(tmp_path / "ad" / adapters.CONFIG_NAME, "w") as f:
        json.dump({**config, "lora_alpha": 32, "lora_dropout": 1.5}, f)
    x = torch.randn(3, 64)
    y = model(x)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        fastlora.load_adapter(model, tmp_path / "ad")
    assert_unchanged(before, snapshot(model))
    assert model[0].scaling == 2.0 and torch.equal(model(x), y)
    # A good load replaces the layer with a new one over the same packed weight; the old layer is untouched.
    old = model[0]
    with open(tmp_path / "ad" / adapters.CONFIG_NAME, "w") as f:
        json.dump({**config, "lora_alpha": 32}, f)
    fastlora.load_adapter(model, tmp_path / "ad")
    assert model[0] is not old and model[0].weight is old.weight and old.scaling == 2.0 and model[0].scaling == 8.0


def test_rank_over_256_is_refused_where_it_enters(tmp_path):
    with pytest.raises(ValueError, match=r"r must be an int in \[1, 256\]; got 257"):
        fastlora.Linear(8, 8, r=257)
    with pytest.raises(ValueError, match=r"r must be an int in \[1, 256\]"):
        fastlora.Linear4bit.from_linear(nn.Linear(64, 8), r=300)
    with pytest.raises(ValueError, match=r"r must be an int in \[1, 256\]"):
        fastlora.inject(nn.Sequential(nn.Linear(8, 8)), "all-linear", r=257, alpha=8)
    model = nn.Sequential(nn.Linear(8, 300))
    layer = fastlora.Linear.from_linear(model[0], r=1)
    layer.lora_A, layer.lora_B = nn.Parameter(torch.randn(257, 8)), nn.Parameter(torch.randn(300, 257))
    from safetensors.torch import save_file
    os.makedirs(tmp_path / "big")
    save_file({"base_model.model.0.lora_A.weight": layer.lora_A.detach(),
               "base_model.model.0.lora_B.weight": layer.lora_B.detach()}, tmp_path / "big" / adapters.WEIGHTS_NAME)
    with open(tmp_path / "big" / adapters.CONFIG_NAME, "w") as f:
        json.dump({"peft_type": "LORA", "r": 257, "lora_alpha": 8}, f)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer '0': r must be an int in \[1, 256\]; got 257"):
        fastlora.load_adapter(model, tmp_path / "big")
    assert_unchanged(before, snapshot(model))


def test_numpy_hyperparameters_save_as_plain_json(tmp_path):
    model = tiny_llama()
    fastlora.inject(model, ["q_proj"], r=np.int64(4), alpha=np.float32(16), dropout=np.float64(0.1))
    fastlora.save_adapter(model, tmp_path / "ad")
    with open(tmp_path / "ad" / adapters.CONFIG_NAME) as f:
        config = json.load(f)
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 16.0, 0.1)
    layer = model.model.layers[0].self_attn.q_proj
    layer.alpha = np.float32(8)  # set after construction: still written as a number
    layer.dropout = object()
    with pytest.raises(ValueError, match="cannot be written as JSON.*nothing was written"):
        fastlora.save_adapter(model, tmp_path / "ad")
    with open(tmp_path / "ad" / adapters.CONFIG_NAME) as f:
        assert json.load(f) == config


def _files_of(path):
    return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


@pytest.fixture
def two_adapters(tmp_path):
    """An adapter folder (alpha 8) with a README beside it, and a model whose adapter differs (alpha 32)."""
    saved_adapter(tmp_path / "ad")
    (tmp_path / "ad" / "README.md").write_text("mine")
    model = tiny_llama()
    fastlora.inject(model, ["q_proj", "v_proj"], r=4, alpha=32)
    randomize_lora_B(model, seed=7)
    return tmp_path / "ad", model


@pytest.mark.parametrize("where", ["weights-write", "fsync", "rename"])
def test_save_over_an_adapter_fails_whole(two_adapters, monkeypatch, where):
    """A write that fails at a step (disk full) leaves the old adapter, whole, and no temporary file (every step:
    tests/test_save_fs.py)."""
    path, model = two_adapters
    before = _files_of(path)
    real_write, real_fsync = _files._write, os.fsync

    def fail(*args):
        raise OSError(28, "No space left on device")

    if where == "weights-write":
        monkeypatch.setattr(_files, "_write", lambda f, *a: fail() if adapters.WEIGHTS_NAME in f else
                            real_write(f, *a))
    elif where == "fsync":
        calls = []
        monkeypatch.setattr(os, "fsync", lambda fd: fail() if calls.append(fd) or len(calls) == 2 else real_fsync(fd))
    else:
        real_replace, calls = os.replace, []  # the new weights' rename fails (putting the old ones back does not)
        monkeypatch.setattr(os, "replace", lambda a, b: fail() if b.endswith(adapters.WEIGHTS_NAME) and
                            not calls.append(b) and len(calls) == 1 else real_replace(a, b))
    with pytest.raises(OSError, match="No space left"):
        fastlora.save_adapter(model, path)
    assert _files_of(path) == before
    assert sorted(os.listdir(path.parent)) == ["ad"]


def test_save_over_an_adapter_replaces_it_and_keeps_other_files(two_adapters):
    path, model = two_adapters
    fastlora.save_adapter(model, path)
    assert sorted(os.listdir(path)) == ["README.md", adapters.CONFIG_NAME, adapters.WEIGHTS_NAME]
    assert (path / "README.md").read_text() == "mine" and sorted(os.listdir(path.parent)) == ["ad"]
    fresh = tiny_llama()
    fastlora.load_adapter(fresh, path)
    assert fresh.model.layers[0].self_attn.q_proj.scaling == 8.0
    torch.testing.assert_close(fresh(tokens()).logits, model(tokens()).logits, rtol=0, atol=0)


def test_a_failed_save_that_cannot_be_undone_leaves_a_folder_that_refuses_to_load(two_adapters, monkeypatch):
    """Renames onto the weights file fail, so does putting the old one back: the folder is left without a config,
    never a loadable mix, and load_adapter says the save did not finish."""
    path, model = two_adapters
    (path / "sub").mkdir()
    real_replace = os.replace

    def replace(src, dst):
        if dst.endswith(adapters.WEIGHTS_NAME):
            raise OSError(5, "killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="killed") as e:
        fastlora.save_adapter(model, path)
    monkeypatch.undo()
    if sys.version_info >= (3, 11):
        assert "left without adapter_config.json" in " ".join(e.value.__notes__)
    assert (path / "README.md").read_text() == "mine" and (path / "sub").is_dir()
    with pytest.raises(FileNotFoundError, match="save_adapter into it did not finish: .*adapter_config.json is "):
        fastlora.load_adapter(tiny_llama(), path)


def test_save_into_a_new_folder(tmp_path):
    model = tiny_llama()
    fastlora.inject(model, ["q_proj"], r=4, alpha=8)
    fastlora.save_adapter(model, tmp_path / "a" / "b")
    assert sorted(os.listdir(tmp_path / "a" / "b")) == [adapters.CONFIG_NAME, adapters.WEIGHTS_NAME]
    assert sorted(os.listdir(tmp_path / "a")) == ["b"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        fastlora.save_adapter(model, tmp_path / "file")


# 4-bit state dicts: the quant state travels with the packed weight.

def _linear4bit_pair(kind):
    torch.manual_seed(0)
    if kind == "fastlora":
        a = fastlora.Linear4bit(128, 64, r=4, alpha=8, compute_dtype=torch.float32, double_quant=True)
        b = fastlora.Linear4bit(128, 64, r=4, alpha=8, compute_dtype=torch.float32, double_quant=False,
                                quant_type="fp4", blocksize=128)
        return a, b
    bnb = pytest.importorskip("bitsandbytes")
    layers = [bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type=q, compress_statistics=dq).to("cpu")
              for q, dq in (("nf4", True), ("fp4", False))]
    pair = [fastlora.Linear4bit.from_linear(m, r=4, alpha=8) for m in layers]
    if kind == "mixed":
        pair[1] = fastlora.Linear4bit(128, 64, r=4, alpha=8, compute_dtype=torch.float32, double_quant=False)
    return pair


@pytest.mark.parametrize("kind", ["fastlora", "bnb", "mixed"])
def test_linear4bit_state_dict_moves_the_function(kind):
    a, b = _linear4bit_pair(kind)
    torch.nn.init.normal_(a.lora_B)
    x = torch.randn(5, 128)
    assert not torch.equal(a(x), b(x))
    for src, dst in ((a, b), (b, a)) if kind == "mixed" else ((a, b),):
        result = dst.load_state_dict(src.state_dict())
        assert not result.missing_keys and not result.unexpected_keys
        assert torch.equal(dst(x), src(x))
        assert (dst.quant_type, dst.blocksize, dst.double_quant) == (src.quant_type, src.blocksize, src.double_quant)


def test_linear4bit_state_dict_refuses_a_bad_state_and_changes_nothing():
    a, b = _linear4bit_pair("fastlora")
    sd = a.state_dict()
    sd["weight.absmax"] = sd["weight.absmax"][:-1]
    x = torch.randn(2, 128)
    y = b(x)
    with pytest.raises(RuntimeError, match="cannot load the 4-bit quant state.*absmax"):
        b.load_state_dict(sd)
    assert torch.equal(b(x), y)
    sd = a.state_dict()
    del sd["weight.quant_map"], sd["weight.absmax"], sd["weight.quant_state.bitsandbytes__nf4"]
    del sd["weight.nested_absmax"], sd["weight.nested_quant_map"]
    with pytest.raises(RuntimeError, match="Missing key.*weight.absmax"):
        b.load_state_dict(sd)


def test_model_state_dict_after_inject_keeps_bitsandbytes_keys(tmp_path):
    """After inject on a 4-bit model the model's state dict still holds every key bitsandbytes wrote, with the
    same tensors (the packed JSON of the non-tensor fields byte for byte), plus the adapters."""
    bnb = pytest.importorskip("bitsandbytes")

    def model4():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 128), bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32).to("cpu"),
                             bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="fp4").to("cpu"))

    expected = model4().state_dict()
    model = model4()
    fastlora.inject(model, ["1", "2"], r=4, alpha=8)
    got = model.state_dict()
    assert set(got) == set(expected) | {f"{i}.{p}" for i in (1, 2) for p in ("lora_A", "lora_B")}
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


# Prebuilt batches: checked against x before any kernel indexes with them.

_BATCH_CHILD = """
import torch, fastlora
from fastlora.grouping import AdapterBatch
torch.manual_seed(0)
n, r, K, N = 3, 4, 32, 24
W, A, B = torch.randn(N, K), torch.randn(n, r, K), torch.randn(n, N, r)
batch = AdapterBatch.build(torch.randint(-1, n, ({built},)), n)
x = torch.randn({used}, K)
ids = torch.randint(-1, n, ({used},))
try:
    fastlora.grouped_lora_linear(x, W, None, A, B, 0.5, ids, batch=batch)
except ValueError as e:
    print("ValueError:", e)
"""


@pytest.mark.parametrize("built,used", [(8, 10), (12, 8)])
def test_prebuilt_batch_for_other_tokens_is_refused(built, used):
    """Run in a child process: before the check, the kernels read and wrote out of bounds (a SIGSEGV here)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _BATCH_CHILD.format(built=built, used=used)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, f"child died ({out.returncode}): {out.stderr[-2000:]}"
    assert f"batch was built for tokens of shape ({built},)" in out.stdout and f"({used} tokens)" in out.stdout


def test_prebuilt_batch_checks():
    from fastlora.grouping import AdapterBatch

    n, K, N = 3, 16, 8
    W, A, B = torch.randn(N, K), torch.randn(n, 2, K), torch.randn(n, N, 2)
    x, ids = torch.randn(2, 5, K), torch.randint(-1, n, (2, 5))
    good = AdapterBatch.build(ids, n)
    expected = fastlora.grouped_lora_linear(x, W, None, A, B, 0.5, ids)
    assert torch.equal(fastlora.grouped_lora_linear(x, W, None, A, B, 0.5, ids, batch=good), expected)
    with pytest.raises(ValueError, match="batch was built for 4 adapters; lora_A holds 3"):
        fastlora.grouped_lora_linear(x, W, None, A, B, 0.5, ids, batch=AdapterBatch.build(ids, 4))
    with pytest.raises(ValueError, match=r"tokens of shape \(10,\)"):
        fastlora.grouped_lora_linear(x, W, None, A, B, 0.5, ids, batch=AdapterBatch.build(ids.reshape(-1), n))
    with pytest.raises(TypeError, match="batch must be a fastlora.AdapterBatch"):
        fastlora.grouped_lora_linear(x, W, None, A, B, 0.5, ids, batch=(good.perm, good.sorted_ids))
