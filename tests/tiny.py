"""A tiny random Llama (no hub access) and float64 oracle copies for the model-level tests."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("transformers", reason="the model-level tests need fastlora[peft]")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fastlora  # noqa: E402
from fastlora import reference  # noqa: E402

VOCAB = 128


def tiny_llama(seed=0) -> LlamaForCausalLM:
    """hidden 64, 2 layers, vocab 128: 14 projection layers (q 64->64, k/v 64->32, mlp 64<->96) + lm_head."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tokens(batch=2, seq=7, seed=0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize_lora_B(model, seed=1):
    """Non-zero lora_B everywhere (fresh adapters are zero, which would hide the low-rank path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def float64_oracle(model):
    """A float64 copy of a model with fastlora.Linear layers, each running ``reference.lora_linear`` (eval)."""
    ref = copy.deepcopy(model).double()
    for mod in ref.modules():
        if isinstance(mod, fastlora.Linear):
            mod.forward = lambda x, m=mod: reference.lora_linear(x, m.weight, m.bias, m.lora_A, m.lora_B,
                                                                 m.scaling)
    return ref


def logits_and_grads(model, ids, dy=None, seed=2):
    """(logits, {name: grad} of every trainable parameter) for one random output gradient."""
    model.zero_grad(set_to_none=True)
    out = model(ids).logits
    if dy is None:
        dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(dy.to(out.dtype))
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def trainer_losses(model, steps=4):
    """``steps`` HF Trainer steps (AdamW, lr 1e-2) on one batch of 2 random sequences of 16; the logged losses."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    data = [{"input_ids": row, "labels": row} for row in ids] * steps
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=steps, learning_rate=1e-2,
                                 lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                                 use_cpu=True, seed=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])


MOE_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss")


def tiny_moe(family: str, seed=0, experts=4, top_k=2, layers=2):
    """A tiny random MoE causal LM of ``family`` (hidden 32, expert intermediate 24, vocab 128, fp32, eval).

    gpt-oss's clamp limit is 0.05 (7.0 in the real model) so that its clamped SwiGLU clips these small activations."""
    from transformers import (
        GptOssConfig,
        GptOssForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  vocab_size=VOCAB, max_position_embeddings=64)
    if family == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=24, num_experts=experts,
                                                   num_experts_per_tok=top_k, **common))
    elif family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(intermediate_size=24, num_local_experts=experts,
                                                 num_experts_per_tok=top_k, **common))
    elif family == "gpt_oss":
        common["max_position_embeddings"] = 131072  # YaRN's factor 32 over its 4096 original positions
        model = GptOssForCausalLM(GptOssConfig(intermediate_size=24, num_local_experts=experts,
                                               num_experts_per_tok=top_k, swiglu_limit=0.05, **common))
        with torch.no_grad():  # transformers initialises the expert biases to zero: make them count
            for name, p in model.named_parameters():
                if name.endswith("_proj_bias"):
                    p.normal_(0, 0.02)
    else:
        raise ValueError(f"unknown MoE family {family!r}")
    return model.eval()
