"""The attention layers of the ASA Hugging Face model (part of the exported code).

One module per layer kind, each with two paths: `full` computes a whole (compacted) sequence
the way training does, per-head keys and all; `decode` continues from the cache, attending
from the latents with the up-projections folded into the query and the output. nsa_kernels'
Triton ops serve `full` on CUDA when importable (`config.attention_backend`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .asa_cache import LayerCache, Tokens
from .asa_ops import (
    gather_per_head,
    gather_positions,
    grouped_attention,
    masked_softmax,
    num_compressed_blocks,
    pack,
    packed_offsets,
    positions_of_blocks,
    rotate,
    selection_overlap,
    selection_scores,
    share_over_query_blocks,
    top_n_blocks,
    unpack,
)
from .configuration_asa import ASAConfig

try:
    import nsa_kernels
except ImportError:
    nsa_kernels = None

QUERY_CHUNK = 256
"""Query rows per step of the inline full-sequence attention (bounds its [T, T] masks)."""

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
    "squared_relu": lambda x: torch.pow(F.relu(x), 2),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


# ----------------------------------------------------------------------------- building blocks


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last axis, computed in float32."""

    def __init__(self, dim: int, eps: float, normalization: str = "RMSNorm") -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if normalization == "LayerNorm" else None

    def forward(self, x: Tensor) -> Tensor:
        shape = (self.dim,)
        if self.bias is None:
            out = F.rms_norm(x.float(), shape, self.weight.float(), self.eps)
        else:
            out = F.layer_norm(x.float(), shape, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class LatentNorm(nn.Module):
    """RMSNorm of each GLA latent head: x [..., h_c, d], weight [h_c, d]."""

    def __init__(self, heads: int, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)) for a gated MLP, down(act(up(x))) otherwise."""

    def __init__(self, config: ASAConfig) -> None:
        super().__init__()
        hidden, ffn, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, ffn, bias=bias) if config.gated_mlp else None
        self.up_proj = nn.Linear(hidden, ffn, bias=bias)
        self.down_proj = nn.Linear(ffn, hidden, bias=bias)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Compressor(nn.Module):
    """One token per complete block [i*s, i*s + l) of [B, T, heads, D] tokens, per head:
    W2 silu(W1 flatten(block + pos_emb) + b1) + b2 (NSA Eq. 7), or the block mean."""

    def __init__(self, config: ASAConfig, heads: int, dim: int) -> None:
        super().__init__()
        self.block, self.stride = config.compress_block_size, config.compress_stride
        self.mlp = config.compressor == "mlp"
        if self.mlp:
            hidden = config.compress_mlp_hidden_size or dim
            self.pos_emb = nn.Parameter(torch.zeros(heads, self.block, dim))
            self.w1 = nn.Parameter(torch.zeros(heads, self.block * dim, hidden))
            self.b1 = nn.Parameter(torch.zeros(heads, hidden))
            self.w2 = nn.Parameter(torch.zeros(heads, hidden, dim))
            self.b2 = nn.Parameter(torch.zeros(heads, dim))

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, H, D] -> [B, N, H, D]."""
        batch, length, heads, dim = x.shape
        if length < self.block:
            return x.new_zeros(batch, 0, heads, dim)
        blocks = x.unfold(1, self.block, self.stride).transpose(-1, -2)  # [B, N, H, l, D]
        if not self.mlp:
            return blocks.mean(dim=3)
        hidden = torch.einsum("bnhf,hfe->bnhe", (blocks + self.pos_emb).flatten(-2), self.w1)
        return torch.einsum("bnhe,hed->bnhd", F.silu(hidden + self.b1), self.w2) + self.b2


# ----------------------------------------------------------------------------- attention layers


def _compress_packed(compressor: Compressor, x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """`compressor` through nsa_kernels on packed sequences (each compressed on its own)."""
    if compressor.mlp:
        return nsa_kernels.compress_mlp(
            x, compressor.pos_emb, compressor.w1, compressor.b1, compressor.w2,
            compressor.b2, compressor.block, compressor.stride, cu_seqlens=cu_seqlens,
        )
    return nsa_kernels.compress_mean(x, compressor.block, compressor.stride, cu_seqlens=cu_seqlens)


def _use_kernels(config: ASAConfig, x: Tensor) -> bool:
    """Whether the full-sequence pass runs through nsa_kernels (config.attention_backend)."""
    backend = config.attention_backend
    if backend == "nsa_kernels" and nsa_kernels is None:
        raise ImportError("attention_backend='nsa_kernels' needs the nsa_kernels package")
    return backend == "nsa_kernels" or (backend == "auto" and nsa_kernels is not None and x.is_cuda)


class SparseBranches:
    """Compression + selection over (per-head or per-group) keys, shared by G and N layers."""

    config: ASAConfig

    def sparse_full(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_cmp: Tensor,
        v_cmp: Tensor,
        gates: Tensor,
        selection_heads: int,
        tokens: Tokens,
        cache: LayerCache | None,
    ) -> Tensor:
        """The inline full-sequence pass, query rows in chunks: gated compressed, selected
        (and for three gates, sliding-window) attention. q [B, T, HQ, DK]; k, v [B, T, HK, .];
        k_cmp, v_cmp [B, N, HK, .]; gates [B, T, HQ, 2 or 3] -> [B, T, HQ, DV]."""
        config, scale = self.config, self.scale
        length, out = q.shape[1], []
        chunk = max(1, QUERY_CHUNK // config.select_block_size) * config.select_block_size
        for start in range(0, length, chunk):
            rows = slice(start, start + chunk)
            pos = tokens.positions[:, rows]
            qpos = pos[:, None, :, None]
            cmp_end = torch.arange(k_cmp.shape[1], device=q.device) * config.compress_stride
            cmp_mask = (cmp_end + config.compress_block_size - 1 <= qpos)  # [B, 1, t, N]
            o_cmp, p_cmp = grouped_attention(q[:, rows], k_cmp, v_cmp, cmp_mask, scale)
            indices = self.select(p_cmp, tokens, rows, selection_heads, cache, length)
            num_slc = self.num_slc(length)
            chosen = indices.new_zeros(*indices.shape[:3], num_slc + 1, dtype=torch.bool)
            chosen = chosen.scatter(-1, torch.where(indices >= 0, indices, num_slc).long(), True)
            chosen = chosen[..., :num_slc]  # [B, t, HI, M]
            keys = torch.arange(length, device=q.device)
            allowed = chosen[..., keys // config.select_block_size]  # [B, t, HI, T]
            allowed = allowed & (keys <= pos[:, :, None, None])
            heads = q.shape[2]
            mask = allowed.transpose(1, 2).repeat_interleave(heads // selection_heads, dim=1)
            o_slc, _ = grouped_attention(q[:, rows], k, v, mask, scale)
            o = gates[:, rows, :, :1] * o_cmp + gates[:, rows, :, 1:2] * o_slc
            if gates.shape[-1] == 3:
                window = (keys <= qpos) & (keys > qpos - config.sliding_window_size)
                o_win, _ = grouped_attention(q[:, rows], k, v, window, scale)
                o = o + gates[:, rows, :, 2:] * o_win
            out.append(o)
        return torch.cat(out, dim=1)

    def num_slc(self, length: int) -> int:
        return -(-length // self.config.select_block_size)

    def select(
        self,
        p_cmp: Tensor,
        tokens: Tokens,
        rows: slice,
        selection_heads: int,
        cache: LayerCache | None,
        length: int,
    ) -> Tensor:
        """Top-n selection blocks [B, t, HI, n] of the query `rows` from their compressed
        attention probabilities p_cmp [B, HQ, t, N] (NSA Eq. 8-10), keys up to `length`."""
        config = self.config
        batch, _, queries, num_cmp = p_cmp.shape
        num_slc = self.num_slc(length)
        blocks = (config.compress_block_size, config.compress_stride, config.select_block_size)
        if tokens.prefill:  # as nsa_kernels' reference computes it
            overlap = selection_overlap(num_cmp, num_slc, *blocks, p_cmp.device)
            score = p_cmp @ overlap.to(p_cmp.dtype)
        else:
            score = selection_scores(p_cmp, num_slc, *blocks)
        score = score.view(batch, selection_heads, -1, queries, num_slc).sum(2)
        score = score.transpose(1, 2)  # [B, t, HI, M]
        positions, valid = tokens.positions[:, rows], tokens.valid[:, rows]
        if config.selection_query_block > 1:
            carry = cache.carry if cache is not None else None
            score, carry = share_over_query_blocks(
                score, positions, valid, config.selection_query_block, carry
            )
            if cache is not None:
                cache.carry = carry
        return top_n_blocks(score, positions, config.select_block_size, config.select_top_n)


class LatentQueryMixin:
    """q_h = [W_UQ_h x ; RoPE(W_QR_h x)], optionally through a normed low-rank latent
    (q_a_proj, q_a_layernorm, q_b_proj) as in DeepSeek-V2 and Megatron's MLA."""

    def init_query(self, config: ASAConfig) -> None:
        self.heads = config.num_attention_heads
        self.d_nope, self.d_rope = config.qk_nope_head_dim, config.qk_rope_head_dim
        out = self.heads * (self.d_nope + self.d_rope)
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, out, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=False)
            self.q_a_layernorm = Norm(config.q_lora_rank, config.norm_eps, config.normalization)
            self.q_b_proj = nn.Linear(config.q_lora_rank, out, bias=False)

    def query(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [B, T, h] -> [B, T, H, d_h + d_R] with RoPE on the last d_R channels."""
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(*x.shape[:2], self.heads, -1).split([self.d_nope, self.d_rope], -1)
        return torch.cat((q_nope, rotate(q_rope, cos, sin)), dim=-1)


class LocalAttention(LatentQueryMixin, nn.Module):
    """"L": MLA over the last w tokens; c = Norm(W_DKV x), k^R = RoPE(W_KR x)."""

    def __init__(self, config: ASAConfig) -> None:
        super().__init__()
        self.config = config
        self.init_query(config)
        self.d_latent, self.d_v = config.kv_lora_rank, config.v_head_dim
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.d_latent + self.d_rope, bias=False
        )
        self.kv_a_layernorm = Norm(self.d_latent, config.norm_eps, config.normalization)
        self.kv_b_proj = nn.Linear(self.d_latent, self.heads * (self.d_nope + self.d_v), bias=False)
        self.o_proj = nn.Linear(
            self.heads * self.d_v, config.hidden_size, bias=config.attention_out_bias
        )
        self.scale = config.softmax_scale or 1.0 / math.sqrt(self.d_nope + self.d_rope)

    def forward(self, x: Tensor, tokens: Tokens, cache: LayerCache | None) -> Tensor:
        cos, sin = tokens.rope(self.d_rope)
        q = self.query(x, cos, sin)  # [B, T, H, d_h + d_R]
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.d_latent, self.d_rope], dim=-1)
        c = self.kv_a_layernorm(c)  # [B, T, d_c]
        k_rope = rotate(k_rope.unsqueeze(2), cos, sin).squeeze(2)  # [B, T, d_R]
        if tokens.prefill:
            out = self.full(q, c, k_rope, tokens)
        else:
            out = self.decode(q, c, k_rope, tokens, cache)
        if cache is not None:
            cache.write({"latent": c, "k_rope": k_rope}, tokens)
        return self.o_proj(out.flatten(2))

    def full(self, q: Tensor, c: Tensor, k_rope: Tensor, tokens: Tokens) -> Tensor:
        """All tokens at once, per-head keys as in training -> [B, T, H, d_v]."""
        kv = self.kv_b_proj(c).view(*c.shape[:2], self.heads, self.d_nope + self.d_v)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        k = torch.cat((k_nope, k_rope[:, :, None].expand(-1, -1, self.heads, -1)), dim=-1)
        window = self.config.sliding_window_size
        if _use_kernels(self.config, q):
            out = nsa_kernels.sliding_window_attention(
                *(pack(t, tokens.after) for t in (q, k, v)), window, scale=self.scale,
                cu_seqlens=packed_offsets(tokens.after),
            )
            return unpack(out, tokens.after, q.shape[1])
        keys = torch.arange(q.shape[1], device=q.device)
        out = []
        for start in range(0, q.shape[1], QUERY_CHUNK):
            rows = slice(start, start + QUERY_CHUNK)
            mask = (keys <= keys[rows, None]) & (keys > keys[rows, None] - window)
            out.append(grouped_attention(q[:, rows], k, v, mask, self.scale)[0])
        return torch.cat(out, dim=1)

    def decode(
        self, q: Tensor, c: Tensor, k_rope: Tensor, tokens: Tokens, cache: LayerCache
    ) -> Tensor:
        """New queries against the cached ring plus the new tokens, from the latents:
        q_h . k_h = (W_UK_h^T q_nope) . c + q_rope . k^R, o_h = W_UV_h (sum p c)."""
        keys_c = torch.cat((cache.tokens["latent"], c), dim=1)  # [B, w + T, d_c]
        keys_r = torch.cat((cache.tokens["k_rope"], k_rope), dim=1)
        new_pos = torch.where(tokens.valid, tokens.positions, -1)
        key_pos = torch.cat((cache.ring_positions, new_pos), dim=1)[:, None, None, :]
        weight = self.kv_b_proj.weight.view(self.heads, self.d_nope + self.d_v, self.d_latent)
        w_uk, w_uv = weight.split([self.d_nope, self.d_v], dim=1)
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
        scores = torch.einsum("bthc,bsc->bhts", q_latent, keys_c)
        scores = (scores + torch.einsum("bthr,bsr->bhts", q_rope, keys_r)) * self.scale
        qpos = tokens.positions[:, None, :, None]
        window = self.config.sliding_window_size
        mask = (key_pos >= 0) & (key_pos <= qpos) & (key_pos > qpos - window)
        probs = masked_softmax(scores, mask).to(c.dtype)
        o_latent = torch.einsum("bhts,bsc->bthc", probs, keys_c)
        return torch.einsum("bthc,hvc->bthv", o_latent, w_uv)


class LatentUpProjection(nn.Module):
    """GLA's per-head up-projections: latent tokens [B, N, h_c, d_c' + d_R] ->
    k [B, N, H, d_h + d_R] = [W_UK_h c^j ; k^R], v [B, N, H, d_v] = W_UV_h c^j, where head
    h reads latent head j = h // (H / h_c). weight [H * (d_h + d_v), d_c']."""

    def __init__(self, config: ASAConfig) -> None:
        super().__init__()
        self.heads, self.latents = config.num_attention_heads, config.global_num_latent_heads
        self.d_nope, self.d_v = config.qk_nope_head_dim, config.v_head_dim
        self.d_latent = config.global_kv_lora_rank
        rows = self.heads * (self.d_nope + self.d_v)
        self.weight = nn.Parameter(torch.zeros(rows, self.d_latent))

    def per_latent(self) -> tuple[Tensor, Tensor]:
        """W_UK [h_c, G, d_h, d_c'] and W_UV [h_c, G, d_v, d_c'] (G heads per latent head)."""
        weight = self.weight.view(self.latents, -1, self.d_nope + self.d_v, self.d_latent)
        w_uk, w_uv = weight.split([self.d_nope, self.d_v], dim=2)
        return w_uk, w_uv

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        latent, k_rope = tokens.split([self.d_latent, tokens.shape[-1] - self.d_latent], -1)
        weight = self.weight.view(self.latents, -1, self.d_latent)
        kv = torch.einsum("bnjc,jkc->bnjk", latent, weight)  # [B, N, h_c, G * (d_h + d_v)]
        kv = kv.reshape(*kv.shape[:2], self.heads, self.d_nope + self.d_v)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        k_rope = k_rope.repeat_interleave(self.heads // self.latents, dim=2)
        return torch.cat((k_nope, k_rope), dim=-1), v


class GlobalAttention(SparseBranches, LatentQueryMixin, nn.Module):
    """"G": GLA with compression and selection; o = g_cmp o_cmp + g_slc o_slc."""

    def __init__(self, config: ASAConfig) -> None:
        super().__init__()
        self.config = config
        self.init_query(config)
        self.latents = config.global_num_latent_heads
        self.d_latent, self.d_v = config.global_kv_lora_rank, config.v_head_dim
        self.kv_a_proj = nn.Linear(config.hidden_size, self.latents * self.d_latent, bias=False)
        self.kv_a_layernorm = LatentNorm(self.latents, self.d_latent, config.norm_eps)
        self.kr_proj = nn.Linear(config.hidden_size, self.d_rope, bias=False)
        self.branch_gate = nn.Linear(config.hidden_size, self.heads * 2, bias=True)
        self.kv_b_proj = LatentUpProjection(config)
        self.compressor = Compressor(config, self.latents, self.d_latent + self.d_rope)
        self.o_proj = nn.Linear(
            self.heads * self.d_v, config.hidden_size, bias=config.attention_out_bias
        )
        self.scale = config.softmax_scale or 1.0 / math.sqrt(self.d_nope + self.d_rope)

    def forward(self, x: Tensor, tokens: Tokens, cache: LayerCache | None) -> Tensor:
        batch, length = x.shape[:2]
        cos, sin = tokens.rope(self.d_rope)
        q = self.query(x, cos, sin)  # [B, T, H, d_h + d_R]
        gates = torch.sigmoid(self.branch_gate(x).float()).to(q.dtype).view(batch, length, -1, 2)
        latent = self.kv_a_layernorm(self.kv_a_proj(x).view(batch, length, self.latents, -1))
        k_rope = rotate(self.kr_proj(x).unsqueeze(2), cos, sin)  # [B, T, 1, d_R]
        latent_tokens = torch.cat((latent, k_rope.expand(-1, -1, self.latents, -1)), dim=-1)
        if cache is not None:
            cache.write({"latent": latent, "k_rope": k_rope[:, :, 0]}, tokens)
            cache.compress(
                "latent", partial(self.cached_latent_tokens, cache), self.compressor,
                self.compressor.block, self.compressor.stride, tokens,
            )
        if tokens.prefill:
            out = self.full(q, gates, latent_tokens, tokens, cache)
        else:
            out = self.decode(q, gates, tokens, cache)
        return self.o_proj(out.flatten(2))

    def cached_latent_tokens(self, cache: LayerCache, start: int, end: int) -> Tensor:
        """[B, end - start, h_c, d_c' + d_R]: cached latent tokens [c^j ; k^R], as compressed."""
        latent = cache.tokens["latent"][:, start:end]
        k_rope = cache.tokens["k_rope"][:, start:end, None].expand(-1, -1, self.latents, -1)
        return torch.cat((latent, k_rope), dim=-1)

    def full(
        self,
        q: Tensor,
        gates: Tensor,
        latent_tokens: Tensor,
        tokens: Tokens,
        cache: LayerCache | None,
    ) -> Tensor:
        """All tokens at once, per-head keys as in training -> [B, T, H, d_v]."""
        length = q.shape[1]
        if _use_kernels(self.config, q):
            return self.full_kernels(q, gates, latent_tokens, tokens)
        compressed = self.compressor(latent_tokens)  # [B, N, h_c, d_c' + d_R]
        k, v = self.kv_b_proj(torch.cat((latent_tokens, compressed), dim=1))
        return self.sparse_full(
            q, k[:, :length], v[:, :length], k[:, length:], v[:, length:], gates,
            self.latents, tokens, cache,
        )

    def full_kernels(
        self, q: Tensor, gates: Tensor, latent_tokens: Tensor, tokens: Tokens
    ) -> Tensor:
        """`full` through nsa_kernels on the rows packed into one sequence."""
        config, lengths = self.config, tokens.after
        cu_seqlens = packed_offsets(lengths)
        q, gates, latent_tokens = (pack(t, lengths) for t in (q, gates, latent_tokens))
        compressed = _compress_packed(self.compressor, latent_tokens, cu_seqlens)
        length = latent_tokens.shape[1]
        k, v = self.kv_b_proj(torch.cat((latent_tokens, compressed), dim=1))
        out = nsa_kernels.nsa_attention(
            q, k[:, :length], v[:, :length], k[:, length:], v[:, length:],
            gates[..., 0], gates[..., 1],
            block_size=config.compress_block_size, stride=config.compress_stride,
            select_block_size=config.select_block_size, top_n=config.select_top_n,
            num_selection_heads=self.latents, selection_query_block=config.selection_query_block,
            scale=self.scale, cu_seqlens=cu_seqlens,
        )
        return unpack(out, lengths, tokens.positions.shape[1])

    def decode(self, q: Tensor, gates: Tensor, tokens: Tokens, cache: LayerCache) -> Tensor:
        """New queries against the cached latents (up-projections folded in) -> [B, T, H, d_v]."""
        config = self.config
        batch, length = q.shape[:2]
        w_uk, w_uv = self.kv_b_proj.per_latent()  # [h_c, G, d, d_c']
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)
        q_nope = q_nope.view(batch, length, self.latents, -1, self.d_nope)
        q_rope = q_rope.view(batch, length, self.latents, -1, self.d_rope)
        q_latent = torch.einsum("btjgd,jgdc->btjgc", q_nope, w_uk)  # [B, T, h_c, G, d_c']

        # Compressed branch: compressed tokens carry their own RoPE part per latent head.
        positions = tokens.positions
        num_cmp = int(num_compressed_blocks(tokens.after, config.compress_block_size,
                                            config.compress_stride).max())
        compressed = cache.compressed.get("latent")
        compressed = compressed[:, :num_cmp] if compressed is not None else q.new_zeros(
            batch, 0, self.latents, self.d_latent + self.d_rope)
        c_cmp, r_cmp = compressed.split([self.d_latent, self.d_rope], dim=-1)
        scores = torch.einsum("btjgc,bnjc->bjgtn", q_latent, c_cmp)
        scores = (scores + torch.einsum("btjgr,bnjr->bjgtn", q_rope, r_cmp)) * self.scale
        ends = torch.arange(num_cmp, device=q.device) * config.compress_stride
        visible = ends + config.compress_block_size - 1 <= positions[:, None, None, :, None]
        p_cmp = masked_softmax(scores, visible)  # [B, h_c, G, T, N]
        o_cmp = torch.einsum("bjgtn,bnjc->btjgc", p_cmp.to(c_cmp.dtype), c_cmp)

        # Selected branch over the raw latent tokens of the chosen blocks.
        indices = self.select(
            p_cmp.flatten(1, 2), tokens, slice(None), self.latents, cache, int(tokens.after.max())
        )  # [B, T, h_c, n]
        key_pos = positions_of_blocks(indices, config.select_block_size)  # [B, T, h_c, P]
        c_sel = gather_per_head(cache.tokens["latent"], key_pos)  # [B, T, h_c, P, d_c']
        r_sel = gather_positions(cache.tokens["k_rope"], key_pos)  # [B, T, h_c, P, d_R]
        scores = torch.einsum("btjgc,btjpc->btjgp", q_latent, c_sel)
        scores = (scores + torch.einsum("btjgr,btjpr->btjgp", q_rope, r_sel)) * self.scale
        allowed = (key_pos >= 0) & (key_pos <= positions[:, :, None, None])
        p_slc = masked_softmax(scores, allowed[:, :, :, None, :]).to(c_sel.dtype)
        o_slc = torch.einsum("btjgp,btjpc->btjgc", p_slc, c_sel)

        gates = gates.view(batch, length, self.latents, -1, 2)
        o_latent = gates[..., :1] * o_cmp + gates[..., 1:] * o_slc
        out = torch.einsum("btjgc,jgvc->btjgv", o_latent, w_uv)
        return out.reshape(batch, length, self.heads, self.d_v)


class GQAAttention(nn.Module):
    """Query, key and value projections of the D and N layers (RoPE on rotary_percent of
    each head)."""

    def __init__(self, config: ASAConfig) -> None:
        super().__init__()
        self.config = config
        self.heads, self.groups, self.d = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim,
        )
        self.rotary_dim = int(self.d * config.rotary_percent)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.d, bias=False)
        self.k_proj = nn.Linear(hidden, self.groups * self.d, bias=False)
        self.v_proj = nn.Linear(hidden, self.groups * self.d, bias=False)
        self.o_proj = nn.Linear(self.heads * self.d, hidden, bias=config.attention_out_bias)
        self.scale = config.softmax_scale or 1.0 / math.sqrt(self.d)

    def qkv(self, x: Tensor, tokens: Tokens) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, T, H, d], k, v [B, T, G, d]; q and k rotated."""
        batch, length = x.shape[:2]
        cos, sin = tokens.rope(self.rotary_dim)
        q = self.q_proj(x).view(batch, length, self.heads, self.d)
        k = self.k_proj(x).view(batch, length, self.groups, self.d)
        v = self.v_proj(x).view(batch, length, self.groups, self.d)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def cached_kv(self, cache: LayerCache, tokens: Tokens) -> tuple[Tensor, Tensor]:
        length = int(tokens.after.max())
        return cache.tokens["k"][:, :length], cache.tokens["v"][:, :length]


class DenseAttention(GQAAttention):
    """"D": full causal attention."""

    def forward(self, x: Tensor, tokens: Tokens, cache: LayerCache | None) -> Tensor:
        q, k, v = self.qkv(x, tokens)
        if cache is not None:
            cache.write({"k": k, "v": v}, tokens)
        if tokens.prefill:
            heads = self.heads
            k = k.repeat_interleave(heads // self.groups, dim=2).transpose(1, 2)
            v = v.repeat_interleave(heads // self.groups, dim=2).transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k, v, is_causal=True, scale=self.scale
            ).transpose(1, 2)
        else:
            k, v = self.cached_kv(cache, tokens)
            key_pos = torch.arange(k.shape[1], device=x.device)
            mask = key_pos <= tokens.positions[:, None, :, None]
            out, _ = grouped_attention(q, k, v, mask, self.scale)
        return self.o_proj(out.flatten(2))


class NSAAttention(SparseBranches, GQAAttention):
    """"N": NSA's compression, selection and sliding-window branches over GQA keys."""

    def __init__(self, config: ASAConfig) -> None:
        super().__init__(config)
        self.branch_gate = nn.Linear(config.hidden_size, self.heads * 3, bias=True)
        self.compress_k = Compressor(config, self.groups, self.d)
        self.compress_v = Compressor(config, self.groups, self.d)

    def forward(self, x: Tensor, tokens: Tokens, cache: LayerCache | None) -> Tensor:
        batch, length = x.shape[:2]
        q, k, v = self.qkv(x, tokens)
        gates = torch.sigmoid(self.branch_gate(x).float()).to(q.dtype).view(batch, length, -1, 3)
        if cache is not None:
            cache.write({"k": k, "v": v}, tokens)
            for name, compressor in (("k", self.compress_k), ("v", self.compress_v)):
                span = partial(self.cached_span, cache.tokens[name])
                cache.compress(
                    name, span, compressor, compressor.block, compressor.stride, tokens
                )
        if tokens.prefill:
            out = self.full(q, k, v, gates, tokens, cache)
        else:
            out = self.decode(q, gates, tokens, cache)
        return self.o_proj(out.flatten(2))

    def full(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        gates: Tensor,
        tokens: Tokens,
        cache: LayerCache | None,
    ) -> Tensor:
        """All tokens at once, as in training -> [B, T, H, d]."""
        config = self.config
        if _use_kernels(config, q):
            lengths = tokens.after
            cu_seqlens = packed_offsets(lengths)
            q, k, v, gates = (pack(t, lengths) for t in (q, k, v, gates))
            k_cmp, v_cmp = (
                _compress_packed(compressor, t, cu_seqlens)
                for compressor, t in ((self.compress_k, k), (self.compress_v, v))
            )
            out = nsa_kernels.nsa_attention(
                q, k, v, k_cmp, v_cmp, gates[..., 0], gates[..., 1],
                block_size=config.compress_block_size, stride=config.compress_stride,
                select_block_size=config.select_block_size, top_n=config.select_top_n,
                selection_query_block=config.selection_query_block,
                window_size=config.sliding_window_size, gate_window=gates[..., 2],
                scale=self.scale, cu_seqlens=cu_seqlens,
            )
            return unpack(out, lengths, tokens.positions.shape[1])
        k_cmp, v_cmp = self.compress_k(k), self.compress_v(v)
        return self.sparse_full(q, k, v, k_cmp, v_cmp, gates, self.groups, tokens, cache)

    @staticmethod
    def cached_span(store: Tensor, start: int, end: int) -> Tensor:
        return store[:, start:end]

    def decode(self, q: Tensor, gates: Tensor, tokens: Tokens, cache: LayerCache) -> Tensor:
        """New queries against cached keys: compressed, selected, last w -> [B, T, H, d]."""
        config = self.config
        positions, scale = tokens.positions, self.scale
        num_cmp = int(num_compressed_blocks(tokens.after, config.compress_block_size,
                                            config.compress_stride).max())
        k_cmp = cache.compressed["k"][:, :num_cmp] if num_cmp else q.new_zeros(
            q.shape[0], 0, self.groups, self.d)
        v_cmp = cache.compressed["v"][:, :num_cmp] if num_cmp else k_cmp
        ends = torch.arange(num_cmp, device=q.device) * config.compress_stride
        visible = ends + config.compress_block_size - 1 <= positions[:, None, :, None]
        o_cmp, p_cmp = grouped_attention(q, k_cmp, v_cmp, visible, scale)
        indices = self.select(
            p_cmp, tokens, slice(None), self.groups, cache, int(tokens.after.max())
        )  # [B, T, G, n]
        k_all, v_all = cache.tokens["k"], cache.tokens["v"]
        key_pos = positions_of_blocks(indices, config.select_block_size)  # [B, T, G, P]
        o_slc = self.gathered(q, k_all, v_all, key_pos, key_pos <= positions[:, :, None, None])
        offsets = torch.arange(config.sliding_window_size, device=q.device)
        window = (positions[:, :, None] - offsets)[:, :, None, :].expand(-1, -1, self.groups, -1)
        o_win = self.gathered(q, k_all, v_all, window, window >= 0)
        return gates[..., :1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:] * o_win

    def gathered(
        self, q: Tensor, k_all: Tensor, v_all: Tensor, key_pos: Tensor, allowed: Tensor
    ) -> Tensor:
        """Each query against its own keys: key_pos [B, T, G, P] positions of the cached
        keys of each KV group (allowed where >= 0 and `allowed`) -> [B, T, H, d]."""
        batch, length = q.shape[:2]
        allowed = allowed & (key_pos >= 0)
        k, v = gather_per_head(k_all, key_pos), gather_per_head(v_all, key_pos)
        qg = q.view(batch, length, self.groups, -1, self.d)  # [B, T, G, H/G, d]
        scores = torch.einsum("btjgd,btjpd->btjgp", qg, k) * self.scale
        probs = masked_softmax(scores, allowed[:, :, :, None, :]).to(v.dtype)
        return torch.einsum("btjgp,btjpd->btjgd", probs, v).reshape(batch, length, self.heads, -1)


ATTENTION = {"L": LocalAttention, "G": GlobalAttention, "D": DenseAttention, "N": NSAAttention}
