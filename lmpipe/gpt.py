"""A decoder-only Transformer (GPT), readable top to bottom: attention → MLP → block → config → loss → model.

Pre-norm residual blocks (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"),
causal self-attention through ``F.scaled_dot_product_attention`` (flash kernels on GPU), a GELU MLP,
learned or rotary positions (Su et al. 2021, "RoFormer", arXiv:2104.09864), tied input/output
embeddings and GPT-2 initialisation. :meth:`GPT.generate` samples with a KV cache, batched, with
temperature, top-k and top-p (Holtzman et al. 2019, arXiv:1904.09751), stopping at end-of-text.

Every forward takes optional ``positions`` (B, T) and a boolean ``attn_mask`` (B, 1, T, T_keys), True
where a query may attend, so callers can left-pad prompts or pack several examples into one row.

Training can take the loss through :func:`linear_cross_entropy`, which fuses the LM head with the
cross-entropy and never holds the (tokens × vocabulary) logits in full.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F


class KVCache:
    """Keys and values of every layer for up to ``max_len`` positions, filled as generation advances."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled so far (all layers)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, H, T, D) keys and values; return everything cached for ``layer``."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def rope_tables(block_size: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (block_size, head_dim) in the rotate-half layout (RoFormer eq. 34)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x_i, x_{i+D/2}) of ``x`` (B, H, T, D) by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head masked self-attention (Vaswani et al. 2017): each position attends to itself and earlier ones."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.layer = layer
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attn_mask: torch.Tensor | None, cache: KVCache | None, rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Outputs (B, T, C), or with ``rows`` those of the flattened (B * T) positions ``rows`` only, (R, C):
        every position's key and value is still made, and the output projection runs over ``rows``."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, H, T_keys, D)
        # Without a mask, queries are causal over keys; a decode step (T == 1) sees the whole cache.
        is_causal = attn_mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        if rows is not None:
            y = y.view(B * T, C).index_select(0, rows)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: expand 4x, GELU (Hendrycks & Gimpel 2016), project back."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()  # exact (erf) GELU, as Hugging Face's "gelu"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attn_mask: torch.Tensor | None, cache: KVCache | None, rows: torch.Tensor | None = None
                ) -> torch.Tensor:
        """(B, T, C), or with ``rows`` (flattened positions) only those positions' outputs, (R, C): the attention
        still reads every position, but its projection, the residual and the MLP run over ``rows`` alone."""
        a = self.attn(self.ln_1(x), rope, attn_mask, cache, rows)
        x = (x if rows is None else x.flatten(0, 1).index_select(0, rows)) + a
        return x + self.mlp(self.ln_2(x))


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    block_size: int = 1024  # longest context
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False  # biases in Linear and LayerNorm layers
    positions: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Generation:
    """Sampled continuations: ``tokens`` (B, N) padded with ``pad_id`` after each row stops."""

    tokens: torch.Tensor  # (B, N) new tokens, the end-of-text token included where one was sampled
    lengths: torch.Tensor  # (B,) new tokens per row, end-of-text included
    finished: torch.Tensor  # (B,) True where the row emitted end-of-text

    def as_lists(self, drop_eot: bool = True) -> list[list[int]]:
        """Each row's new tokens as a list, without the final end-of-text unless ``drop_eot`` is False."""
        out = []
        for row, n, done in zip(self.tokens.tolist(), self.lengths.tolist(), self.finished.tolist(), strict=True):
            out.append(row[: n - 1] if done and drop_eot else row[:n])
        return out


def column_rows(batch: int, length: int, start: int, stop: int, device: torch.device | str | None = None
                ) -> torch.Tensor:
    """Indices, in the flattened (``batch`` * ``length``) positions, of columns ``start`` to ``stop`` - 1 of every
    row, row by row: :meth:`GPT.hidden`'s ``rows`` for a (batch, stop - start) slice of its states."""
    cols = torch.arange(start, stop, device=device)
    return (torch.arange(batch, device=device).unsqueeze(1) * length + cols).flatten()


def widen(x: torch.Tensor) -> torch.Tensor:
    """Half-precision values in float32 (float32 and float64 stay as they are): softmaxes are taken in these."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def head_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype a fused LM head's matmuls run in: the autocast dtype where autocast is on, else ``h``'s."""
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


def add_weight_grad(grad_w: torch.Tensor, g: torch.Tensor, x: torch.Tensor) -> None:
    """``grad_w += g.T @ x`` for one chunk of a fused LM head; ``grad_w`` is float32 (or float64) whatever the
    matmul's dtype. ``addmm_`` needs one dtype, so a half-precision chunk's product is rounded once, then summed."""
    if g.dtype == grad_w.dtype:
        grad_w.addmm_(g.t(), x)
    else:
        grad_w += g.t() @ x


def _nll_and_grad(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                  grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of the logits ``x @ w.T`` (one chunk) and, if ``grad``, its gradient in the logits.

    The softmax is taken in float32 (or float64) whatever the matmul's dtype. The gradient, softmax minus the one-hot
    target, is written over the logits buffer in the matmul's dtype. Rows whose target is ``ignore_index`` are
    not zeroed here (they hold a softmax less one in column 0): the caller masks them out on the (c, C) side,
    which is cheaper than on the (c, V) one.
    """
    logits = x @ w.t()  # (c, V)
    logp = torch.log_softmax(logits, dim=1, dtype=torch.promote_types(logits.dtype, torch.float32))
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0).unsqueeze(1)
    nll = -torch.where(valid, logp.gather(1, safe).squeeze(1), 0.0).sum()
    if not grad:
        return nll, None
    g = torch.exp(logp, out=logits)  # the softmax, over the logits' buffer
    return nll, g.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=g.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy (mean or sum) through the LM head, chunk by chunk, with the gradients made in the same pass.

    Forward runs the head's three matmuls per chunk (logits, then the gradients of ``h`` and of the weight),
    so the chunk's logits are freed before the next chunk starts; backward only scales what forward kept:
    the (N, C) gradient of ``h``, the float32 (V, C) gradient of the weight, and the divisor (the target count
    for a mean, 1 for a sum).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk: int, dtype: torch.dtype, mean: bool) -> torch.Tensor:
        x_all, w = h.to(dtype), weight.to(dtype)
        valid_all = (targets != ignore_index).unsqueeze(1)
        total = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                x, valid = x_all[s : s + chunk], valid_all[s : s + chunk]
                nll, g = _nll_and_grad(x, w, targets[s : s + chunk], ignore_index, grad=True)
                total += nll
                grad_h[s : s + chunk] = (g @ w) * valid
                add_weight_grad(grad_w, g, x * valid)
        count = valid_all.sum() if mean else torch.ones((), dtype=torch.long, device=h.device)
        ctx.save_for_backward(grad_h, grad_w, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out / count
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype), None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         chunk: int = 1024, reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """``F.cross_entropy(h @ weight.T, targets, ignore_index=..., reduction=...)`` without the (N, V) logits.

    ``h`` (N, C) are final hidden states, ``weight`` (V, C) the LM head, ``targets`` (N,). The logits are made
    ``chunk`` rows at a time; when gradients are wanted each chunk's are made at once and the chunk is freed,
    so the largest thing held is one chunk's (chunk, V) logits. Under autocast the matmuls run in the autocast
    dtype and the softmax in float32, as in the plain path (a linear layer under autocast, then a float32
    cross-entropy). The mean over no targets is NaN and the sum 0, as ``F.cross_entropy``'s.
    """
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be >= 1, got {chunk}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    device, dtype = h.device.type, head_dtype(h)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, ignore_index, chunk, dtype, reduction == "mean")
    x_all, w = h.to(dtype), weight.to(dtype)
    total = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=h.device)
    with torch.autocast(device, enabled=False):
        for s in range(0, h.shape[0], chunk):
            total += _nll_and_grad(x_all[s : s + chunk], w, targets[s : s + chunk], ignore_index, grad=False)[0]
    return total / (targets != ignore_index).sum() if reduction == "mean" else total


class GPT(nn.Module):
    """Token (+ learned position) embeddings → n_layer pre-norm blocks → final LayerNorm → tied LM head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.positions == "rope" and (config.n_embd // config.n_head) % 2:
            raise ValueError("rotary positions need an even head dimension (n_embd / n_head)")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017, arXiv:1608.05859)
        if config.positions == "rope":
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer) so the residual stream's
        # variance does not grow with depth (two residual additions per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (token embeddings count, being tied)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding and self.wpe is not None else n

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the matmuls plus attention (PaLM, arXiv:2204.02311, app. B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def hidden(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None, cache: KVCache | None = None,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final-layer-normed hidden states (B, T, C) of token ids ``idx`` (B, T).

        ``rows`` (R,), indices into the flattened (B * T) positions, asks for those positions' states only,
        (R, C), in that order. Every layer but the last still runs over every position (later positions attend
        to them); the last block's attention projection, its MLP and the final norm run over ``rows`` alone.
        A reward read at each sequence's last token, a loss over the response tokens, or a prompt's prefill
        (whose keys and values every layer still stores in ``cache``) needs no more.
        """
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if positions is None:
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
            positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        if cache is not None and attn_mask is None and start > 0 and T > 1:
            # several new queries after a filled cache: each sees the cache and the new tokens up to itself
            attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=idx.device).tril(start)[None, None]
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, D) or (B, T, D)
            rope = (cos, sin) if cos.dim() == 2 else (cos.unsqueeze(1), sin.unsqueeze(1))
        x = self.drop(x)
        last = len(self.h) - 1
        for i, block in enumerate(self.h):
            x = block(x, rope, attn_mask, cache, rows if i == last else None)
        if rows is not None and last < 0:
            x = x.flatten(0, 1).index_select(0, rows)
        if cache is not None:
            cache.pos = start + T
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                ignore_index: int = -100, loss_chunk: int = 0, skip_ignored: bool = False
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, V) and, with ``targets`` (B, T), the mean cross-entropy over targets != ignore_index.

        With targets and ``loss_chunk`` > 0 the loss goes through :func:`linear_cross_entropy`, ``loss_chunk``
        tokens at a time, and the logits are not made: the first value returned is None. ``skip_ignored`` is
        :meth:`target_nll`'s.
        """
        if targets is not None and loss_chunk > 0:
            return None, self.target_nll(idx, targets, positions=positions, attn_mask=attn_mask,
                                         ignore_index=ignore_index, chunk=loss_chunk, skip_ignored=skip_ignored)
        logits = self.lm_head(self.hidden(idx, positions, attn_mask))
        if targets is None:
            return logits, None
        wide = widen(logits)  # bf16 logits: a float32 softmax
        loss = F.cross_entropy(wide.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
        return logits, loss

    def target_nll(self, idx: torch.Tensor, targets: torch.Tensor, *, positions: torch.Tensor | None = None,
                   attn_mask: torch.Tensor | None = None, ignore_index: int = -100, chunk: int = 1024,
                   reduction: Literal["mean", "sum"] = "mean", skip_ignored: bool = False) -> torch.Tensor:
        """Cross-entropy of ``targets`` (B, T) through the fused head (:func:`linear_cross_entropy`), no logits made.

        ``skip_ignored`` runs the head, the final norm and the last block's MLP and attention projection (``rows``
        of :meth:`hidden`) over the positions whose target is not ``ignore_index`` only, which pays when many are
        ignored (instruction tuning's prompts and padding). Finding them reads the targets on the
        host (a device sync), and the head's shapes then vary from batch to batch, so under ``torch.compile``
        the flag is passed over and every position goes through the head (the result is the same).
        """
        flat = targets.reshape(-1)
        if skip_ignored and not torch.compiler.is_compiling():
            keep = (flat != ignore_index).nonzero().squeeze(1)
            h, flat = self.hidden(idx, positions, attn_mask, rows=keep), flat.index_select(0, keep)
        else:
            h = self.hidden(idx, positions, attn_mask).flatten(0, 1)
        return linear_cross_entropy(h, self.lm_head.weight, flat, ignore_index, chunk, reduction)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]] | torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eot_id: int | None = 0, pad_id: int = 1,
                 generator: torch.Generator | None = None) -> Generation:
        """Sample up to ``max_new_tokens`` after each prompt, batched, with a KV cache.

        Prompts of different lengths are left-padded and masked; a prompt longer than
        ``block_size - max_new_tokens`` keeps its last tokens. ``temperature == 0`` is greedy decoding.
        A row stops at ``eot_id``; later positions hold ``pad_id``. Dropout is off while generating.
        """
        was_training = self.training
        self.eval()
        try:
            return self._generate(prompts, max_new_tokens, temperature, top_k, top_p, eot_id, pad_id, generator)
        finally:
            self.train(was_training)

    def _generate(self, prompts: list[list[int]] | torch.Tensor, max_new_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None, eot_id: int | None, pad_id: int,
                  generator: torch.Generator | None) -> Generation:
        if not 0 < max_new_tokens < self.config.block_size:
            raise ValueError(f"max_new_tokens must be in [1, {self.config.block_size - 1}]")
        rows = prompts.tolist() if isinstance(prompts, torch.Tensor) else [list(p) for p in prompts]
        keep = self.config.block_size - max_new_tokens
        rows = [r[-keep:] for r in rows]
        if any(len(r) == 0 for r in rows):
            raise ValueError("every prompt needs at least one token (start with end-of-text for an empty prompt)")
        device = self.wte.weight.device
        B, P = len(rows), max(len(r) for r in rows)
        idx = torch.tensor([[pad_id] * (P - len(r)) + r for r in rows], device=device)  # (B, P) left-padded
        valid = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            valid[i, P - len(r) :] = True
        padded = bool((~valid[:, :P]).any())
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # each row's positions start at 0
        cfg = self.config
        cache = KVCache(cfg.n_layer, B, cfg.n_head, P + max_new_tokens, cfg.n_embd // cfg.n_head,
                        device, self.wte.weight.dtype)
        mask = None
        if padded:
            causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
            # a padding query attends to itself only, so no row of the mask is empty (which gives NaN)
            mask = (causal & valid[:, None, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)
        last = column_rows(B, P, P - 1, P, device)  # the prefill's states are needed at the last column only
        h = self.hidden(idx, positions[:, :P] if padded else None, mask, cache, rows=last)  # (B, C)
        out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        lengths = torch.zeros(B, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            nxt = sample_next(self.lm_head(h).float(), temperature, top_k, top_p, generator)  # (B,)
            alive = ~finished
            out[:, t] = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
            lengths += alive.long()
            if eot_id is not None:
                finished |= alive & (nxt == eot_id)
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            step_mask = valid[:, None, None, : P + t + 1] if padded else None
            pos = positions[:, P + t : P + t + 1] if padded else None
            h = self.hidden(out[:, t : t + 1], pos, step_mask, cache)[:, -1]
        return Generation(out, lengths, finished)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of ``logits`` (B, V): greedy at temperature 0, else top-k / top-p sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return categorical(logits.softmax(-1), generator)


def categorical(probs: torch.Tensor, generator: torch.Generator | None = None, block: int = 64) -> torch.Tensor:
    """One index per row of ``probs`` (B, V), drawn with probability proportional to its entry (rows with a
    positive sum), like ``torch.multinomial(probs, 1)``.

    On the CPU, ``torch.multinomial`` draws one exponential number per entry (the exponential-race trick): for a
    few dozen rows of a 4,096-token vocabulary that is most of a decoding step. Here two uniform numbers per row
    do it, by inverse transform sampling in two levels: a block of ``block`` entries with probability in
    proportion to its sum, then an entry within the block. The cumulative sums are in float64 and short (the
    block count, then ``block``), so no entry's share is lost to rounding, and a zero entry is never drawn. Other
    devices keep ``torch.multinomial``.
    """
    if probs.device.type != "cpu":
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    B, V = probs.shape
    padded = F.pad(probs, (0, -V % block)).view(B, -1, block)  # (B, blocks, block), zero-padded
    cum = padded.sum(-1).double().cumsum(-1)  # (B, blocks)
    total = cum[:, -1]
    if not bool(((total > 0) & torch.isfinite(total)).all()):  # as torch.multinomial refuses such rows
        raise ValueError("categorical: every row of probabilities needs a positive, finite sum (NaN or inf logits?)")
    u = torch.rand(B, 2, dtype=torch.float64, generator=generator)
    chosen = torch.searchsorted(cum, below(u[:, :1] * cum[:, -1:], cum[:, -1:]), right=True)  # (B, 1)
    inner = padded.gather(1, chosen[..., None].expand(B, 1, block)).squeeze(1).double().cumsum(-1)  # (B, block)
    within = torch.searchsorted(inner, below(u[:, 1:] * inner[:, -1:], inner[:, -1:]), right=True)
    return (chosen * block + within).squeeze(1)


def below(x: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``x`` capped just below ``total``: u * total can round up to total, which would fall past the last entry."""
    return torch.minimum(x, torch.nextafter(total, torch.zeros_like(total)))
