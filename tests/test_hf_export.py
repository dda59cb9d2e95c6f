"""Export to a Hugging Face folder: files, tensor names and shapes, and logits recomputed from the export.

Without ``transformers`` installed, the exported tensors are run through a small re-statement of what
GPT-2 and GPT-NeoX compute (Conv1D layout, per-head fused q/k/v, rotate-half RoPE) and must give our
logits; with it installed, ``AutoModelForCausalLM`` must load the folder and give the same logits.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmpipe.bpe import train_tokenizer
from lmpipe.checkpoint import save_model_folder
from lmpipe.config import TokenizerConfig
from lmpipe.gpt import GPT, GPTConfig
from lmpipe.hf_export import export_hf

torch.set_num_threads(1)
TEXTS = ["def join(a, b): return a + b", "Return the sum of the values.", "Ünïcödé and 中文 text round-trips."] * 20


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer([TEXTS], TokenizerConfig(vocab_size=300)).save(str(path))
    return path


def exported(tmp_path, tokenizer_file, positions: str, bias: bool = False) -> tuple[GPT, dict, dict]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=320, block_size=16, n_layer=2, n_head=2, n_embd=32, positions=positions,
                          bias=bias)).eval()
    with torch.no_grad():  # make biases and gains visible in the comparison
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    model_dir = save_model_folder(model, tmp_path / "model", {"eot_id": 0, "pad_id": 1})
    (model_dir / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    out = export_hf(model_dir, tmp_path / "hf")
    return model, load_file(str(out / "model.safetensors")), json.loads((out / "config.json").read_text())


def _attend(q, k, v):  # (B, H, T, D), causal, written out rather than through SDPA
    T = q.size(2)
    att = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return att.softmax(-1) @ v


def gpt2_logits(t: dict, cfg: dict, idx: torch.Tensor) -> torch.Tensor:
    B, T = idx.shape
    H, C = cfg["n_head"], cfg["n_embd"]
    eps = cfg["layer_norm_epsilon"]
    x = t["transformer.wte.weight"][idx] + t["transformer.wpe.weight"][:T]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (C,), t[p + "ln_1.weight"], t[p + "ln_1.bias"], eps)
        q, k, v = (h @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]).split(C, dim=-1)
        q, k, v = (z.view(B, T, H, C // H).transpose(1, 2) for z in (q, k, v))
        y = _attend(q, k, v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
        h = F.layer_norm(x, (C,), t[p + "ln_2.weight"], t[p + "ln_2.bias"], eps)
        h = F.gelu(h @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"])
        x = x + h @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (C,), t["transformer.ln_f.weight"], t["transformer.ln_f.bias"], eps)
    return x @ t["transformer.wte.weight"].T  # tied output embedding


def neox_logits(t: dict, cfg: dict, idx: torch.Tensor) -> torch.Tensor:
    B, T = idx.shape
    H, C = cfg["num_attention_heads"], cfg["hidden_size"]
    D, eps = C // H, cfg["layer_norm_eps"]
    inv = 1.0 / cfg["rotary_emb_base"] ** (torch.arange(0, D, 2).float() / D)
    ang = torch.outer(torch.arange(T).float(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(z):
        return z * cos + torch.cat([-z[..., D // 2 :], z[..., : D // 2]], -1) * sin

    x = t["gpt_neox.embed_in.weight"][idx]
    for i in range(cfg["num_hidden_layers"]):
        p = f"gpt_neox.layers.{i}."
        h = F.layer_norm(x, (C,), t[p + "input_layernorm.weight"], t[p + "input_layernorm.bias"], eps)
        qkv = (h @ t[p + "attention.query_key_value.weight"].T + t[p + "attention.query_key_value.bias"])
        qkv = qkv.view(B, T, H, 3 * D).transpose(1, 2)  # NeoX: per head, [q | k | v]
        q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
        y = _attend(rope(q), rope(k), v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ t[p + "attention.dense.weight"].T + t[p + "attention.dense.bias"]
        h = F.layer_norm(x, (C,), t[p + "post_attention_layernorm.weight"], t[p + "post_attention_layernorm.bias"], eps)
        h = F.gelu(h @ t[p + "mlp.dense_h_to_4h.weight"].T + t[p + "mlp.dense_h_to_4h.bias"])
        x = x + h @ t[p + "mlp.dense_4h_to_h.weight"].T + t[p + "mlp.dense_4h_to_h.bias"]
    x = F.layer_norm(x, (C,), t["gpt_neox.final_layer_norm.weight"], t["gpt_neox.final_layer_norm.bias"], eps)
    return x @ t["embed_out.weight"].T


def test_gpt2_folder_files_config_and_tensors(tmp_path, tokenizer_file):
    model, tensors, cfg = exported(tmp_path, tokenizer_file, "learned")
    out = tmp_path / "hf"
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "generation_config.json",
                                              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["n_positions"], cfg["vocab_size"]) == (2, 2, 32, 16, 320)
    assert cfg["activation_function"] == "gelu" and cfg["tie_word_embeddings"] and cfg["eos_token_id"] == 0
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    assert tensors["transformer.h.1.mlp.c_proj.weight"].shape == (128, 32)
    assert torch.equal(tensors["transformer.h.0.attn.c_attn.bias"], torch.zeros(96))  # no biases: zeros
    assert "lm_head.weight" not in tensors and len(tensors) == 4 + 2 * 12
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|endoftext|>" and tok_cfg["pad_token"] == "<|pad|>"


@pytest.mark.parametrize("bias", [False, True])
def test_gpt2_export_recomputes_our_logits(tmp_path, tokenizer_file, bias):
    model, tensors, cfg = exported(tmp_path, tokenizer_file, "learned", bias)
    idx = torch.randint(0, 320, (2, 16))
    torch.testing.assert_close(gpt2_logits(tensors, cfg, idx), model(idx)[0], rtol=1e-4, atol=1e-4)


def test_neox_export_for_rotary_positions_recomputes_our_logits(tmp_path, tokenizer_file):
    model, tensors, cfg = exported(tmp_path, tokenizer_file, "rope")
    assert cfg["model_type"] == "gpt_neox" and not cfg["use_parallel_residual"] and cfg["rotary_pct"] == 1.0
    assert tensors["gpt_neox.layers.0.attention.query_key_value.weight"].shape == (96, 32)
    # head 1's query rows come right after head 0's [q | k | v] rows
    q_head1 = model.h[0].attn.c_attn.weight[16:32]
    assert torch.equal(tensors["gpt_neox.layers.0.attention.query_key_value.weight"][48:64], q_head1)
    idx = torch.randint(0, 320, (2, 16))
    torch.testing.assert_close(neox_logits(tensors, cfg, idx), model(idx)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_transformers_loads_the_folder_with_the_same_logits(tmp_path, tokenizer_file, positions):
    transformers = pytest.importorskip("transformers")
    model, _, _ = exported(tmp_path, tokenizer_file, positions, bias=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), torch_dtype=torch.float32).eval()
    idx = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(tokenizer_file))
    assert tok(TEXTS[2])["input_ids"] == ours.encode(TEXTS[2]).ids
    assert tok.decode(tok(TEXTS[2])["input_ids"]) == TEXTS[2]
