"""Hugging Face configuration of a GPT with Alternating Sparse Attention (ASA) layers.

Copied next to the weights by `megatron-nsa export-hf` and loaded with
`trust_remote_code=True`, so it imports only transformers. Field names follow Hugging Face
conventions where one exists (`num_hidden_layers`, `intermediate_size`, ...) and the ASA
config's names otherwise; every field maps to one field of `megatron_nsa.ASATransformerConfig`.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

LAYER_KINDS = "LGDN"
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu", "squared_relu", "quick_gelu")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "none", "learned_absolute")
ATTENTION_BACKENDS = ("auto", "inline", "nsa_kernels")
COMPRESSORS = ("mlp", "mean")


class ASAConfig(PreTrainedConfig):
    """Architecture of an ASA GPT: which attention each layer has and its dimensions.

    Layer i (0-based) has kind `attention_pattern[i % len(attention_pattern)]`: "L" (MLA
    over a sliding window), "G" (GLA with compression and selection), "D" (dense GQA) or
    "N" (three-branch NSA over GQA). `attention_backend` picks the attention code of the
    full-sequence pass: "auto" (nsa_kernels' Triton ops on CUDA when importable, the inline
    PyTorch code otherwise), "inline", or "nsa_kernels" (its ops on any device).
    """

    model_type = "asa"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        intermediate_size: int = 4096,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        q_lora_rank: int | None = None,
        kv_lora_rank: int = 256,
        qk_nope_head_dim: int = 64,
        qk_rope_head_dim: int = 32,
        v_head_dim: int = 64,
        attention_pattern: str = "LG",
        sliding_window_size: int = 512,
        compress_block_size: int = 32,
        compress_stride: int = 16,
        select_block_size: int = 64,
        select_top_n: int = 16,
        selection_query_block: int = 1,
        global_num_latent_heads: int = 2,
        global_kv_lora_rank: int = 256,
        compressor: str = "mlp",
        compress_mlp_hidden_size: int | None = None,
        hidden_act: str = "gelu",
        gated_mlp: bool = False,
        mlp_bias: bool = False,
        attention_out_bias: bool = False,
        normalization: str = "RMSNorm",
        norm_eps: float = 1e-5,
        rotary_base: float = 10000.0,
        rotary_percent: float = 1.0,
        softmax_scale: float | None = None,
        position_embedding_type: str = "rope",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        attention_backend: str = "auto",
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.attention_pattern = attention_pattern
        self.sliding_window_size = sliding_window_size
        self.compress_block_size = compress_block_size
        self.compress_stride = compress_stride
        self.select_block_size = select_block_size
        self.select_top_n = select_top_n
        self.selection_query_block = selection_query_block
        self.global_num_latent_heads = global_num_latent_heads
        self.global_kv_lora_rank = global_kv_lora_rank
        self.compressor = compressor
        self.compress_mlp_hidden_size = compress_mlp_hidden_size
        self.hidden_act = hidden_act
        self.gated_mlp = gated_mlp
        self.mlp_bias = mlp_bias
        self.attention_out_bias = attention_out_bias
        self.normalization = normalization
        self.norm_eps = norm_eps
        self.rotary_base = rotary_base
        self.rotary_percent = rotary_percent
        self.softmax_scale = softmax_scale
        self.position_embedding_type = position_embedding_type
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.attention_backend = attention_backend
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self._validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def layer_kind(self, layer_idx: int) -> str:
        """Kind ("L", "G", "D" or "N") of the layer with this 0-based index."""
        return self.attention_pattern[layer_idx % len(self.attention_pattern)]

    def _validate(self) -> None:
        def bad(field: str, rule: str) -> ValueError:
            return ValueError(f"ASAConfig.{field}={getattr(self, field)!r} is invalid: {rule}")

        pattern = self.attention_pattern
        if not isinstance(pattern, str) or not pattern or set(pattern) - set(LAYER_KINDS):
            raise bad("attention_pattern", f"a non-empty string of the letters {LAYER_KINDS}")
        choices = {
            "hidden_act": ACTIVATIONS,
            "normalization": NORMALIZATIONS,
            "position_embedding_type": POSITION_EMBEDDINGS,
            "attention_backend": ATTENTION_BACKENDS,
            "compressor": COMPRESSORS,
        }
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise bad(field, f"allowed: {', '.join(allowed)}")
        l, s, lp = self.compress_block_size, self.compress_stride, self.select_block_size
        if l % s or lp % s:
            raise bad("compress_stride", f"must divide compress_block_size={l} and "
                      f"select_block_size={lp}")
        if l > lp:
            raise bad("compress_block_size", f"must be <= select_block_size={lp}")
        if self.select_top_n < 3:
            raise bad("select_top_n", "must be >= 3 (block 0 and the two most recent blocks)")
        if lp % self.selection_query_block:
            raise bad("selection_query_block", f"must divide select_block_size={lp}")
        heads = self.num_attention_heads
        if "G" in pattern and heads % self.global_num_latent_heads:
            raise bad("global_num_latent_heads", f"must divide num_attention_heads={heads}")
        if set(pattern) & set("DN") and heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", f"must divide num_attention_heads={heads}")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
