"""The causal LM: a local pretrained Hugging Face folder, or a small Llama built from config; LoRA via peft.

Nothing is downloaded: ``local_files_only=True`` everywhere. A model built from config gets its vocabulary
size from the tokenizer (rounded up to a multiple of 64, which GPUs like) unless ``model.vocab_size`` is set.
"""

from __future__ import annotations

from typing import Any

import torch

from aifactory_train.recipe import ConfigError


def llama_config(model: dict[str, Any], data_info: dict[str, Any]):
    from transformers import LlamaConfig

    tokens = data_info["vocab_size"]
    vocab = model.get("vocab_size") or -(-tokens // 64) * 64
    if vocab < tokens:
        raise ConfigError(f"config key 'model.vocab_size': {vocab} is smaller than the tokenizer ({tokens} tokens); "
                          f"use null (sized from the tokenizer) or a value >= {tokens}")
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=model["hidden_size"],
        intermediate_size=model["intermediate_size"],
        num_hidden_layers=model["num_layers"],
        num_attention_heads=model["num_heads"],
        num_key_value_heads=model.get("num_kv_heads") or model["num_heads"],
        max_position_embeddings=model["max_position_embeddings"],
        bos_token_id=data_info["bos_token_id"],
        eos_token_id=data_info["eos_token_id"],
        pad_token_id=data_info["pad_token_id"],
        tie_word_embeddings=False,
    )


def build_base_model(model: dict[str, Any], data_info: dict[str, Any], load_weights: bool = True):
    """The transformers model, float32 (Lightning's precision plugin does the mixed precision)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = model.get("pretrained_path")
    attn = model["attn_implementation"]
    if path is None:
        return AutoModelForCausalLM.from_config(llama_config(model, data_info), attn_implementation=attn)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if data_info["vocab_size"] > config.vocab_size:
        raise ConfigError(
            f"config key 'model.pretrained_path': in '{path}' the tokenizer has {data_info['vocab_size']} tokens but "
            f"the model's vocab_size (config.json) is {config.vocab_size}; token ids past {config.vocab_size - 1} "
            f"would have no embedding. Use the tokenizer saved with this model, or resize the model's embeddings")
    if not load_weights:
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                                    attn_implementation=attn)
    except OSError as err:
        raise ConfigError(f"config key 'model.pretrained_path': cannot load the model in '{path}': "
                          f"{str(err).splitlines()[0]}") from None


def linear_module_names(net: torch.nn.Module) -> list[str]:
    """The names LoRA can target: the last part of the name of every Linear layer."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in net.named_modules() if isinstance(module, torch.nn.Linear)})


def apply_lora(net, lora: dict[str, Any]):
    from peft import LoraConfig, get_peft_model

    available = linear_module_names(net)
    missing = [name for name in lora["target_modules"] if name not in available]
    if missing:
        raise ConfigError(f"config key 'model.lora.target_modules': {missing} are not layers of this model; its "
                          f"linear layers are {available}")
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM")
    return get_peft_model(net, config)


def build_model(model: dict[str, Any], data_info: dict[str, Any], load_weights: bool = True):
    net = build_base_model(model, data_info, load_weights)
    if model["finetune"] == "lora":
        net = apply_lora(net, model["lora"])
    return net
