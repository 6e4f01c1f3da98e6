"""End to end: a Llama-shaped model (transformers config, random weights, no download), LoRA on every linear
layer but lm_head, tokens per second of one training step (forward, loss, backward, AdamW step).

Competitors: ``peft`` (get_peft_model, adapters kept in the model dtype), ``fastlora`` (fastlora.inject if
the package has it, else each nn.Linear wrapped with fastlora.Linear.from_linear) and ``reference``
(fastlora.reference in every layer). All start from the same base weights and the same adapters (B nonzero),
and the first step's loss and adapter-gradient norm are compared with the reference's before timing.

QLoRA variant (ids ``e2e-qlora-...``): every base linear but lm_head quantised once to 4 bits (NF4, double
quant, blocksize 64) in a bitsandbytes Linear4bit, the model's dtype as compute dtype, fp32 adapters.
Competitors ``qlora-peft`` (get_peft_model over the bitsandbytes layers), ``qlora-fastlora`` (fastlora.inject
wrapping them in fastlora.Linear4bit) and ``reference`` (the dequantised weights in nn.Linear layers,
fastlora.reference with fp32 adapters): see ``competitors.inject_4bit``.

DoRA variant (ids ``e2e-dora-...``): the same model with PEFT's DoRA on every adapted linear (``use_dora=True``;
each magnitude starts at ||W_n||, as PEFT's): ``peft``, ``fastlora`` (``inject(use_dora=True)``) and ``reference``
(``fastlora.reference.dora_linear``, which builds B A and the norm every call as PEFT does).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import competitors
import harness
import pytest
import torch

IMPLS = ("reference", "peft", "fastlora")
QLORA_IMPLS = ("reference", "qlora-peft", "qlora-fastlora")
# The first step's loss and LoRA gradient norm against the reference model's (bf16 rounding compounds over
# the layers, so the bound is looser than a single layer's).
E2E_TOLERANCE = 5e-2


@dataclass(frozen=True)
class Case(harness.Cell):
    dtype: str
    R: int
    impl: str
    qlora: bool = False  # 4-bit base linears
    dora: bool = False  # PEFT's DoRA on every adapted linear

    @property
    def variant(self) -> str:
        return "qlora" if self.qlora else "dora" if self.dora else ""

    @property
    def group(self) -> str:
        e = harness.grid().e2e
        v = f"{self.variant}-" if self.variant else ""
        return f"e2e-{v}{self.dtype}-L{e['layers']}-B{e['batch']}-S{e['seq']}-r{self.R}"


CASES = [Case(dtype, R, impl, qlora, dora) for qlora, dora in ((False, False), (True, False), (False, True))
         for dtype in harness.grid().dtypes for R in harness.grid().e2e["ranks"]
         for impl in (QLORA_IMPLS if qlora else IMPLS)]
_FIRST: dict = {}  # (variant, dtype, R) -> (loss, grad norm) of the reference model


def _model(case: Case, impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    e = harness.grid().e2e
    cfg = LlamaConfig(**e["config"], num_hidden_layers=e["layers"])
    torch.manual_seed(0)
    with torch.device(harness.device()):
        model = LlamaForCausalLM._from_config(cfg, dtype=harness.DTYPES[case.dtype])
    if case.qlora:
        model, how = competitors.inject_4bit(model, impl, case.R, 2 * case.R)
    else:
        model, how = competitors.inject(model, impl, case.R, 2 * case.R, dora=case.dora)
    with torch.no_grad():
        for key, A, B in competitors.adapter_pairs(model):
            g = torch.Generator(device="cpu").manual_seed(zlib.crc32(key.encode()))
            A.copy_(torch.randn(A.shape, generator=g) * A.shape[1] ** -0.5)
            B.copy_(torch.randn(B.shape, generator=g) * B.shape[1] ** -0.5)
    model.train()
    return model, how


def _first_step(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return loss.item(), torch.sqrt(sum((g.float() ** 2).sum() for g in grads)).item()


def _reference_first(case: Case, ids):
    key = (case.variant, case.dtype, case.R)
    if key not in _FIRST:
        model, _ = _model(case, "reference")
        _FIRST[key] = _first_step(model, ids)
        del model
    return _FIRST[key]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_e2e(benchmark, request, case: Case):
    harness.require("transformers", "peft")  # the end-to-end model is built from a transformers config
    if case.impl in ("peft", "qlora-peft"):
        harness.require("peft", "peft")
    if case.impl == "qlora-peft" and harness.bnb_unavailable():
        pytest.skip(harness.bnb_unavailable())
    e = harness.grid().e2e
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, e["config"]["vocab_size"], (e["batch"], e["seq"]), generator=gen).to(harness.device())

    want = _reference_first(case, ids)
    model, how = _model(case, case.impl)
    got = _first_step(model, ids)
    errs = {name: abs(g - w) / abs(w) for name, g, w in zip(("loss", "grad_norm"), got, want, strict=True)}
    for name, err in errs.items():
        if not err <= E2E_TOLERANCE:
            raise AssertionError(f"{case.id}: first-step {name} {got} vs reference {want}: rel err {err:.3g}")

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if harness.CUDA:
        torch.cuda.reset_peak_memory_stats()
    timing = harness.measure_steps(step, warmup=3 if harness.CUDA else 1, reps=10 if harness.CUDA else 2)
    peak = torch.cuda.max_memory_allocated() if harness.CUDA else None
    harness.pedantic(benchmark, step, rounds=3)

    tokens = e["batch"] * e["seq"]
    tps = tokens / (timing.median_ms * 1e-3)
    benchmark.group = case.group
    benchmark.extra_info.update(harness.provenance())
    benchmark.extra_info.update(dict(
        suite=f"{case.variant}-e2e" if case.variant else "e2e", mode="train", dtype=case.dtype, R=case.R,
        impl=case.impl,
        injected_by=how, model=dict(e["config"], layers=e["layers"]), batch=e["batch"], seq=e["seq"], tokens=tokens,
        median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms, reps=timing.reps,
        timing=timing.method, tokens_per_s=tps, peak_mem_bytes=peak,
        trainable_params=sum(p.numel() for p in params), rel_err=errs))
    request.node.user_properties.append(("summary", f"{timing.median_ms:9.2f} ms/step  {tps:10.0f} tokens/s"))
