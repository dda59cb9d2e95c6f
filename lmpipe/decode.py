"""Batched sampling with a static KV cache, so each decode step can be replayed as one CUDA graph.

:meth:`lmpipe.gpt.GPT.generate` grows the keys it attends to by one every step, so every step has new
shapes and launches each of its kernels from Python; at small per-token work (decoding) that launch
overhead, not the GPU, sets the speed. Here the cache has its final length from the start: a decode step
writes its key and value at a position held in a tensor and attends over the whole cache through a mask
of the positions filled so far. Every step then has the same shapes and reads its inputs from the same
buffers, which is what :class:`torch.cuda.CUDAGraph` needs to capture the step once and replay it
(the technique of "static cache" generation in inference engines). On CPU the same code runs eagerly.

The prompt is prefilled by the model's own forward into a :class:`lmpipe.gpt.KVCache` of the final length,
whose tensors then serve as the static cache. Sampling (temperature, top-k) runs outside the graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmpipe.gpt import GPT, Generation, KVCache, apply_rope, column_rows, sample_next


class StaticDecoder:
    """Decode steps of ``model`` for ``batch`` rows over a static cache of ``max_len`` positions."""

    def __init__(self, model: GPT, batch: int, max_len: int, cuda_graph: bool = False) -> None:
        if max_len > model.config.block_size:
            raise ValueError(f"max_len {max_len} exceeds block_size {model.config.block_size}")
        c, p = model.config, model.wte.weight
        self.model, self.batch, self.max_len = model, batch, max_len
        self.cache = KVCache(c.n_layer, batch, c.n_head, max_len, c.n_embd // c.n_head, p.device, p.dtype)
        # the static inputs of a step, written in place before each replay
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=p.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=p.device)  # cache column this step writes
        self.key_mask = torch.zeros(batch, 1, 1, max_len, dtype=torch.bool, device=p.device)
        self.use_graph = cuda_graph and p.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    @torch.no_grad()
    def _step(self) -> torch.Tensor:
        """One token per row through every block, reading and writing the static buffers; logits (B, V)."""
        m, cache = self.model, self.cache
        x = m.wte(self.token)  # (B, 1, C)
        rope = None
        if m.wpe is not None:
            x = x + m.wpe(self.position)
        else:
            rope = (m.rope_cos[self.position].unsqueeze(1), m.rope_sin[self.position].unsqueeze(1))  # (B, 1, 1, D)
        self.key_mask.index_fill_(3, self.slot, True)  # this step's key becomes visible to itself and later
        for i, block in enumerate(m.h):
            attn, h = block.attn, block.ln_1(x)
            B, T, C = h.shape
            q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2)
                       for t in attn.c_attn(h).split(C, dim=2))  # (B, H, 1, D)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
            cache.k[i].index_copy_(2, self.slot, k.to(cache.k.dtype))
            cache.v[i].index_copy_(2, self.slot, v.to(cache.v.dtype))
            y = F.scaled_dot_product_attention(q, cache.k[i], cache.v[i], attn_mask=self.key_mask)  # (B, H, 1, D)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + block.mlp(block.ln_2(x))
        return m.lm_head(m.ln_f(x))[:, -1].float()

    def _capture(self) -> None:
        """Record one decode step as a CUDA graph (after warm-up runs on a side stream, as PyTorch requires)."""
        saved = (self.cache.k.clone(), self.cache.v.clone(), self.key_mask.clone())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        # warm-up and capture wrote into the cache and mask: restore them
        self.cache.k.copy_(saved[0])
        self.cache.v.copy_(saved[1])
        self.key_mask.copy_(saved[2])

    def step(self, token: torch.Tensor, position: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits (B, V) after feeding ``token`` (B,) at ``position`` (B,), stored in cache column ``slot``."""
        self.token.copy_(token.view(-1, 1))
        self.position.copy_(position.view(-1, 1))
        self.slot.fill_(slot)
        if not self.use_graph:
            return self._step()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits  # type: ignore[return-value]

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Run the left-padded prompts ``idx`` (B, P) with ``valid`` (B, P) into the cache; last logits (B, V)."""
        P = idx.size(1)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        causal = torch.ones(P, P, dtype=torch.bool, device=idx.device).tril()
        mask = (causal & valid[:, None, None, :]) | torch.eye(P, dtype=torch.bool, device=idx.device)
        self.cache.pos = 0
        last = column_rows(idx.size(0), P, P - 1, P, idx.device)  # states are needed at the last column only
        h = self.model.hidden(idx, positions, mask, self.cache, rows=last)
        self.key_mask.zero_()
        self.key_mask[:, 0, 0, :P] = valid
        return self.model.lm_head(h).float()


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, eot_id: int | None = 0, pad_id: int = 1,
             generator: torch.Generator | None = None, cuda_graph: bool = True,
             decoder: StaticDecoder | None = None) -> Generation:
    """Sample like :meth:`GPT.generate` (same arguments and result) with a static cache and, on CUDA, CUDA graphs.

    Pass a ``decoder`` built for the same batch size and length to reuse its captured graph across calls.
    """
    device = model.wte.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    idx = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], device=device)  # (B, P)
    valid = idx.new_zeros(B, P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        valid[i, P - len(p):] = True
    dec = decoder or StaticDecoder(model, B, P + max_new_tokens, cuda_graph)
    if (dec.batch, dec.max_len) != (B, P + max_new_tokens):
        raise ValueError("the decoder was built for another batch size or length")
    logits = dec.prefill(idx, valid)
    position = valid.long().sum(1)  # each row's next position
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, None, generator)
        alive = ~finished
        out[:, t] = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
        lengths += alive.long()
        if eot_id is not None:
            finished |= alive & (nxt == eot_id)
        # a host sync per step would cost as much as the step: check for the end only every 16 steps
        if t == max_new_tokens - 1 or (eot_id is not None and t % 16 == 15 and bool(finished.all())):
            break
        logits = dec.step(out[:, t], position + t, P + t)
    return Generation(out, lengths, finished)
