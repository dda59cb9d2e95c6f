"""Export a trained GPT as a Hugging Face ``transformers`` model folder: config, safetensors, tokenizer.

The architecture is chosen to compute exactly what :class:`lmpipe.gpt.GPT` computes:

- learned positions → ``GPT2LMHeadModel``: pre-norm blocks, exact GELU, tied embeddings. GPT-2 keeps
  its linear weights as ``Conv1D`` (in, out), so they are transposed; our absent biases are zeros.
- rotary positions → ``GPTNeoXForCausalLM`` with ``rotary_pct=1`` and sequential (not parallel)
  residuals: LayerNorm and a plain GELU MLP as ours, rotate-half RoPE as ours. (Llama would need
  RMSNorm and a gated SiLU MLP, which this model does not have.) NeoX lays the fused q/k/v
  projection out head by head, so its rows are regrouped.

``transformers`` is not needed to export; loading the folder needs it (an optional extra).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lmpipe.checkpoint import load_model_folder, read_model_config, replace_dir
from lmpipe.gpt import GPT

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, used by every LayerNorm of the model


def _bias(layer: torch.nn.Module, size: int) -> torch.Tensor:
    return layer.bias.detach() if getattr(layer, "bias", None) is not None else torch.zeros(size)


def gpt2_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """State dict of ``GPT2LMHeadModel`` (without the tied ``lm_head.weight``)."""
    C = model.config.n_embd
    out = {"transformer.wte.weight": model.wte.weight, "transformer.wpe.weight": model.wpe.weight,
           "transformer.ln_f.weight": model.ln_f.weight, "transformer.ln_f.bias": _bias(model.ln_f, C)}
    for i, b in enumerate(model.h):
        p = f"transformer.h.{i}."
        out |= {
            p + "ln_1.weight": b.ln_1.weight, p + "ln_1.bias": _bias(b.ln_1, C),
            p + "ln_2.weight": b.ln_2.weight, p + "ln_2.bias": _bias(b.ln_2, C),
            # Conv1D stores (in_features, out_features): the transpose of nn.Linear's weight
            p + "attn.c_attn.weight": b.attn.c_attn.weight.t(), p + "attn.c_attn.bias": _bias(b.attn.c_attn, 3 * C),
            p + "attn.c_proj.weight": b.attn.c_proj.weight.t(), p + "attn.c_proj.bias": _bias(b.attn.c_proj, C),
            p + "mlp.c_fc.weight": b.mlp.c_fc.weight.t(), p + "mlp.c_fc.bias": _bias(b.mlp.c_fc, 4 * C),
            p + "mlp.c_proj.weight": b.mlp.c_proj.weight.t(), p + "mlp.c_proj.bias": _bias(b.mlp.c_proj, C),
        }
    return out


def gpt2_config(model: GPT) -> dict[str, Any]:
    c = model.config
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
        "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
        "n_head": c.n_head, "n_inner": 4 * c.n_embd, "activation_function": "gelu",
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
    }


def _neox_qkv(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows [q heads | k heads | v heads] → NeoX's [q_h, k_h, v_h for each head h]."""
    three_c = weight.size(0)
    rest = weight.shape[1:]
    return weight.reshape(3, n_head, three_c // (3 * n_head), *rest).transpose(0, 1).reshape(three_c, *rest)


def neox_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """State dict of ``GPTNeoXForCausalLM`` (output embedding stored explicitly)."""
    C, H = model.config.n_embd, model.config.n_head
    out = {"gpt_neox.embed_in.weight": model.wte.weight, "embed_out.weight": model.wte.weight.clone(),
           "gpt_neox.final_layer_norm.weight": model.ln_f.weight,
           "gpt_neox.final_layer_norm.bias": _bias(model.ln_f, C)}
    for i, b in enumerate(model.h):
        p = f"gpt_neox.layers.{i}."
        out |= {
            p + "input_layernorm.weight": b.ln_1.weight, p + "input_layernorm.bias": _bias(b.ln_1, C),
            p + "post_attention_layernorm.weight": b.ln_2.weight,
            p + "post_attention_layernorm.bias": _bias(b.ln_2, C),
            p + "attention.query_key_value.weight": _neox_qkv(b.attn.c_attn.weight, H),
            p + "attention.query_key_value.bias": _neox_qkv(_bias(b.attn.c_attn, 3 * C), H),
            p + "attention.dense.weight": b.attn.c_proj.weight, p + "attention.dense.bias": _bias(b.attn.c_proj, C),
            p + "mlp.dense_h_to_4h.weight": b.mlp.c_fc.weight, p + "mlp.dense_h_to_4h.bias": _bias(b.mlp.c_fc, 4 * C),
            p + "mlp.dense_4h_to_h.weight": b.mlp.c_proj.weight,
            p + "mlp.dense_4h_to_h.bias": _bias(b.mlp.c_proj, C),
        }
    return out


def neox_config(model: GPT) -> dict[str, Any]:
    c = model.config
    return {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd, "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
        "intermediate_size": 4 * c.n_embd, "hidden_act": "gelu", "max_position_embeddings": c.block_size,
        "rotary_pct": 1.0, "partial_rotary_factor": 1.0, "rotary_emb_base": c.rope_theta, "rope_theta": c.rope_theta,
        "use_parallel_residual": False, "attention_bias": True, "layer_norm_eps": LAYER_NORM_EPS,
        "attention_dropout": 0.0, "hidden_dropout": 0.0, "initializer_range": 0.02, "tie_word_embeddings": False,
    }


def tokenizer_files(tokenizer_path: Path, out: Path, eot_id: int, pad_id: int, max_length: int) -> None:
    """tokenizer.json plus the small files ``AutoTokenizer`` reads to find the special tokens."""
    shutil.copyfile(tokenizer_path, out / "tokenizer.json")
    tok = Tokenizer.from_file(str(tokenizer_path))
    eot, pad = tok.id_to_token(eot_id), tok.id_to_token(pad_id)
    specials = {"bos_token": eot, "eos_token": eot, "pad_token": pad}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "clean_up_tokenization_spaces": False, **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False), encoding="utf-8")


def export_hf(model_dir: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``out_dir`` (atomically): config.json, model.safetensors, generation_config.json, tokenizer files."""
    model = load_model_folder(model_dir)
    _, extra = read_model_config(model_dir)
    eot_id, pad_id = extra.get("eot_id", 0), extra.get("pad_id", 1)
    learned = model.config.positions == "learned"
    tensors = gpt2_tensors(model) if learned else neox_tensors(model)
    config = gpt2_config(model) if learned else neox_config(model)
    config |= {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": pad_id, "use_cache": True,
               "torch_dtype": str(dtype).removeprefix("torch.")}
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    generation = {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": pad_id}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    tokenizer_files(Path(model_dir) / "tokenizer.json", tmp, eot_id, pad_id, model.config.block_size)
    replace_dir(tmp, out_dir)
    return out_dir
