"""`aift plan`'s view of this recipe: one training step of its causal LM on the meta device (recipe.PlanExample)."""

from __future__ import annotations

from typing import Any

from aifactory_train.recipe import PlanExample

from .model import build_model


def plan_example(model: dict[str, Any], data: dict[str, Any], batch: int, dtype) -> PlanExample:
    import torch

    # the tokenizer's vocabulary, rounded up to a multiple of 64 as the recipe trains it
    vocab = model.get("vocab_size") or -(-int(data.get("tokenizer_vocab_size") or 32000) // 64) * 64
    net = build_model(model, {"vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
                      load_weights=False)
    if model.get("gradient_checkpointing"):
        net.gradient_checkpointing_enable()
    tokens = int(data.get("max_length") or 2048)
    ids = torch.zeros(batch, tokens, dtype=torch.long)

    def step():
        return net(input_ids=ids, labels=ids).loss

    notes = ["LoRA: gradients and optimizer states for the adapters only"] if model.get("finetune") == "lora" else []
    return PlanExample(net=net, step=step, shape=f"{tokens} tokens, vocab {vocab}", tokens=tokens, notes=notes)
