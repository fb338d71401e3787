"""ASATransformerConfig: Megatron's MLA config plus the fields of Alternating Sparse Attention.

Local layers reuse Megatron's MLA fields (q_lora_rank, kv_lora_rank, qk_head_dim,
qk_pos_emb_head_dim, v_head_dim); global layers reuse the head dims and add GLA's latent
heads. Where the ASA paper is silent the defaults follow the NSA paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.transformer_config import MLATransformerConfig

LAYER_KINDS = {
    "L": "local: MLA with a sliding window",
    "G": "global: GLA with compression + selection",
    "D": "dense: full causal attention with GQA",
    "N": "NSA: compression + selection + window over GQA K/V",
}
COMPRESSORS = ("mlp", "mean")
NSA_BACKENDS = ("auto", "triton", "reference")
MAX_HEAD_DIM = 256
"""Largest query/key or value head dim the attention kernels take (un-absorbed layout)."""


def _bad(field: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"ASATransformerConfig.{field}={value!r} is invalid: {allowed}")


@dataclass
class ASATransformerConfig(MLATransformerConfig):
    """Configuration of a GPT model with Alternating Sparse Attention layers.

    Set by `__post_init__` whatever was passed: `multi_latent_attention=True` (the ASA layers
    apply RoPE themselves, so GPTModel must not build a rotary embedding), and
    `hetereogenous_dist_checkpoint=True` when the layers are of more than one kind (their
    parameters differ, so checkpoints keep one key per layer instead of stacking layers).
    """

    attention_pattern: str = "LG"
    """Layer kinds repeated across depth by global 1-based layer number n:
    kind = pattern[(n - 1) % len(pattern)]. Letters: L (local MLA sliding window),
    G (global GLA compression + selection), D (dense GQA), N (classic three-branch NSA)."""

    sliding_window_size: int = 512
    """w: keys t - w < j <= t are visible to query t in local layers (and NSA's window branch)."""

    compress_block_size: int = 32
    """l: tokens per compression block; block i covers [i*s, i*s + l)."""

    compress_stride: int = 16
    """s: distance between the starts of consecutive compression blocks; must divide l and l'."""

    select_block_size: int = 64
    """l': tokens per selection block; must be >= l."""

    select_top_n: int = 16
    """n: selection blocks per query (block 0 and the 2 most recent are always among them)."""

    selection_query_block: int = 1
    """q: consecutive queries that share the selection of their first query (the ASA paper
    uses 4); divides l'."""

    global_num_latent_heads: int = 2
    """h_c: GLA latent heads in global layers; each serves H / h_c query heads."""

    global_kv_lora_rank: int = 256
    """d_c': latent dim of each GLA latent head."""

    compressor: str = "mlp"
    """How a block becomes one compressed token: "mlp" (learnable, NSA Eq. 7) or "mean"."""

    compress_mlp_hidden_size: int | None = None
    """Hidden width of the MLP compressor; None means the latent token dim (d_c' + d_R)."""

    nsa_backend: str = "auto"
    """Attention ops backend: "auto" (Triton on CUDA, reference otherwise), "triton",
    "reference"."""

    fuse_elementwise: bool = False
    """Run the elementwise glue of the layers (RoPE with the concatenation of RoPE and
    non-RoPE halves, the split of the up-projections into keys and values, the norms of
    `megatron_nsa.norm` with their fp32 casts, the gated sum of branches) as torch.compile'd
    kernels on CUDA, as Megatron's bias / activation fusions do; no effect on CPU."""

    rope_type: str = "rope"
    """Plain RoPE unless YaRN is asked for (Megatron's MLA default is DeepSeek-V3's YaRN)."""

    rotary_scaling_factor: float = 1.0
    """YaRN scaling factor; 1.0 means no scaling."""

    attention_dropout: float = 0.0
    """Must stay 0.0: the ASA attention ops have no dropout (Megatron's default is 0.1)."""

    def __post_init__(self) -> None:
        if self.rope_type is None:  # Megatron-LM passes None when --rope-type is not given
            self.rope_type = "rope"
        self._validate_asa()
        self.multi_latent_attention = True
        kinds = {self.layer_kind(n) for n in range(1, self.num_layers + 1)}
        if len(kinds) > 1:
            self.hetereogenous_dist_checkpoint = True
        super().__post_init__()

    def layer_kind(self, layer_number: int) -> str:
        """Kind ("L", "G", "D" or "N") of the layer with this global 1-based number."""
        if layer_number < 1:
            raise ValueError(f"layer_number={layer_number} must be >= 1 (Megatron numbers from 1)")
        return self.attention_pattern[(layer_number - 1) % len(self.attention_pattern)]

    def _validate_asa(self) -> None:
        pattern = self.attention_pattern
        if not isinstance(pattern, str) or not pattern or set(pattern) - set(LAYER_KINDS):
            raise _bad(
                "attention_pattern", pattern,
                "a non-empty string of the letters " + ", ".join(LAYER_KINDS),
            )
        for field in (
            "sliding_window_size", "compress_block_size", "compress_stride",
            "select_block_size", "select_top_n", "selection_query_block",
            "global_num_latent_heads", "global_kv_lora_rank",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise _bad(field, value, "must be a positive integer")
        l, s, lp = self.compress_block_size, self.compress_stride, self.select_block_size
        if l % s:
            raise _bad("compress_stride", s, f"must divide compress_block_size={l}")
        if lp % s:
            raise _bad("compress_stride", s, f"must divide select_block_size={lp}")
        if l > lp:
            raise _bad("compress_block_size", l, f"must be <= select_block_size={lp}")
        if self.select_top_n < 3:
            raise _bad(
                "select_top_n", self.select_top_n,
                "must be >= 3 (block 0 and the two most recent blocks are always selected)",
            )
        if lp % self.selection_query_block:
            raise _bad(
                "selection_query_block", self.selection_query_block,
                f"must divide select_block_size={lp}",
            )
        if self.compressor not in COMPRESSORS:
            raise _bad("compressor", self.compressor, f"allowed: {', '.join(COMPRESSORS)}")
        hidden = self.compress_mlp_hidden_size
        if hidden is not None and (not isinstance(hidden, int) or hidden < 1):
            raise _bad("compress_mlp_hidden_size", hidden, "must be None or a positive integer")
        if not isinstance(self.fuse_elementwise, bool):
            raise _bad("fuse_elementwise", self.fuse_elementwise, "must be True or False")
        if self.nsa_backend not in NSA_BACKENDS:
            raise _bad("nsa_backend", self.nsa_backend, f"allowed: {', '.join(NSA_BACKENDS)}")
        if self.attention_dropout:
            raise _bad(
                "attention_dropout", self.attention_dropout,
                "the ASA attention ops have no dropout; set 0.0 (--attention-dropout 0)",
            )
        self._validate_heads()

    def _validate_heads(self) -> None:
        heads, tp = self.num_attention_heads, self.tensor_model_parallel_size
        if heads % tp:
            raise _bad(
                "num_attention_heads", heads,
                f"must be a multiple of tensor_model_parallel_size={tp}",
            )
        uses_global = "G" in self.attention_pattern
        latent = self.global_num_latent_heads
        if uses_global and heads % latent:
            raise _bad(
                "global_num_latent_heads", latent,
                f"must divide num_attention_heads={heads}",
            )
        if uses_global and latent % tp and tp % latent:
            raise _bad(
                "global_num_latent_heads", latent,
                f"must be a multiple or a divisor of tensor_model_parallel_size={tp} "
                "(latent heads are split over TP ranks, or replicated when TP > h_c)",
            )
        groups = self.num_query_groups or heads
        if set(self.attention_pattern) & {"D", "N"} and (heads % groups or groups % tp):
            raise _bad(
                "num_query_groups", groups,
                f"must divide num_attention_heads={heads} and be a multiple of "
                f"tensor_model_parallel_size={tp} (GQA KV heads of D and N layers)",
            )
        qk_dim = self.qk_head_dim + self.qk_pos_emb_head_dim
        if qk_dim > MAX_HEAD_DIM:
            raise _bad(
                "qk_head_dim", self.qk_head_dim,
                f"qk_head_dim + qk_pos_emb_head_dim = {qk_dim} exceeds the kernels' "
                f"limit of {MAX_HEAD_DIM}",
            )
        if self.v_head_dim > MAX_HEAD_DIM:
            raise _bad("v_head_dim", self.v_head_dim, f"must be <= {MAX_HEAD_DIM}")
        if self.qk_pos_emb_head_dim % 2:
            raise _bad("qk_pos_emb_head_dim", self.qk_pos_emb_head_dim, "must be even (RoPE)")
