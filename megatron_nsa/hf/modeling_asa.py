"""Hugging Face model of a GPT with Alternating Sparse Attention (ASA) layers.

The same math as megatron_nsa's Megatron-Core modules, layer by layer: pre-norm transformer
layers whose attention is local MLA over a sliding window ("L"), GLA with compression and
selection ("G"), dense GQA ("D") or three-branch NSA ("N"). Copied, with the files it imports
(asa_layers.py: the attention layers; asa_cache.py: the latent cache; asa_ops.py: the
attention math), next to the weights by `megatron-nsa export-hf` and loaded with
`trust_remote_code=True`: they import only torch and transformers (and nsa_kernels' Triton
ops for full-sequence passes on CUDA, when importable).

Generation keeps an `ASACache` of latents rather than per-head keys and values: a ring of
the last w latent tokens per local layer; every latent token plus the compressed tokens per
global layer (the tokens of an unfinished compression block are the newest latent tokens);
keys and values (and compressed ones) for D and N layers.

Positions come from the attention mask: a token's position is the number of real tokens
before it in its row, as in Megatron, where every sequence starts at position 0. The first
forward (prefill) moves each row's real tokens to the front, so left padding sits at the
end of the row, where causal attention never reads it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .asa_cache import ASACache, LayerCache, Tokens
from .asa_layers import (
    ATTENTION,
    MLP,
    Compressor,
    LatentNorm,
    LatentUpProjection,
    Norm,
)
from .configuration_asa import ASAConfig


class ASADecoderLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(.)): Megatron's pre-norm TransformerLayer."""

    def __init__(self, config: ASAConfig, layer_idx: int) -> None:
        super().__init__()
        self.kind = config.layer_kind(layer_idx)
        self.input_layernorm = Norm(config.hidden_size, config.norm_eps, config.normalization)
        self.self_attn = ATTENTION[self.kind](config)
        self.post_attention_layernorm = Norm(
            config.hidden_size, config.norm_eps, config.normalization
        )
        self.mlp = MLP(config)

    def forward(self, x: Tensor, tokens: Tokens, cache: LayerCache | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), tokens, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- cache names

CACHE_FIELD = (
    "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
)
"""What the installed transformers calls the cache in model outputs: `cache` from 5.25 on,
`past_key_values` before (generate reads it back from there)."""


def given_cache(cache: object, past_key_values: object) -> object:
    """The cache a forward was given: generate passes it as `cache` from transformers 5.25
    on and as `past_key_values` before; callers may use either name, not both."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


# ----------------------------------------------------------------------------- models


class ASAPreTrainedModel(PreTrainedModel):
    config_class = ASAConfig
    base_model_prefix = "model"
    _no_split_modules = ["ASADecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """generate() must not make a DynamicCache: the model makes its own ASACache."""
        return False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (Norm, LatentNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, LatentUpProjection):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Compressor) and module.mlp:
            for param in (module.w1, module.w2):
                nn.init.normal_(param, mean=0.0, std=std)
            for param in (module.pos_emb, module.b1, module.b2):
                nn.init.zeros_(param)


class ASAModel(ASAPreTrainedModel):
    """Embeddings, ASA decoder layers and the final norm."""

    def __init__(self, config: ASAConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(
            ASADecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = Norm(config.hidden_size, config.norm_eps, config.normalization)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: ASACache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        cache: ASACache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids [B, T] (or inputs_embeds [B, T, h]); attention_mask [B, past + T] with
        0 for padding -> last_hidden_state [B, T, h] and the cache. Positions follow the
        attention mask, so `position_ids` are refused rather than ignored."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if kwargs.get("position_ids") is not None:
            raise ValueError(
                "position_ids are not accepted: a token's position is the number of real "
                "tokens before it in its row (from attention_mask), as in training"
            )
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = self._cache(given_cache(cache, past_key_values), use_cache)
        tokens, order = self._tokens(attention_mask, cache, batch, length, x.device)
        if tokens.prefill:
            x = x.gather(1, order[:, :, None].expand_as(x))
        if hasattr(self, "embed_positions"):
            x = x + self._position_embeddings(tokens.positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, tokens, cache.layers[i] if cache is not None else None)
        x = self.norm(x)
        if tokens.prefill:
            x = torch.empty_like(x).scatter_(1, order[:, :, None].expand_as(x), x)
        if cache is not None:
            cache.lengths, cache.columns = tokens.after, cache.columns + length
        return BaseModelOutputWithPast(last_hidden_state=x, **{CACHE_FIELD: cache})

    def _cache(self, given: object, use_cache: bool) -> ASACache | None:
        """The cache to fill: the one given, or a new one when caching."""
        if isinstance(given, ASACache):
            return given
        if given is not None:
            # An empty transformers Cache (from generate's defaults) is replaced by ours.
            if getattr(given, "get_seq_length", lambda: 1)() != 0:
                raise TypeError(
                    f"the cache (cache / past_key_values) must be an ASACache, got "
                    f"{type(given).__name__}"
                )
        return ASACache(self.config) if use_cache else None

    def _tokens(
        self,
        attention_mask: Tensor | None,
        cache: ASACache | None,
        batch: int,
        length: int,
        device: torch.device,
    ) -> tuple[Tokens, Tensor | None]:
        """Positions of the new columns, and (first forward) the order that moves each row's
        real tokens to the front."""
        past = cache.columns if cache is not None else 0
        if attention_mask is None:
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        else:
            if attention_mask.shape != (batch, past + length):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                    f"({batch}, {past + length}): the cached columns ({past}) plus the new ones"
                )
            valid = attention_mask[:, past:].to(device=device, dtype=torch.bool)
        count = valid.sum(1)
        base = self.config.rotary_base
        if past == 0:
            order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
            positions = torch.arange(length, device=device).expand(batch, -1)
            compact = positions < count[:, None]
            zero = torch.zeros_like(count)
            return Tokens(positions, compact, zero, count, True, base), order
        before = cache.lengths.to(device)
        positions = before[:, None] + valid.long().cumsum(1) - 1
        return Tokens(positions.clamp(min=0), valid, before, before + count, False, base), None

    def _position_embeddings(self, positions: Tensor) -> Tensor:
        limit = self.config.max_position_embeddings
        if int(positions.max()) >= limit:
            raise ValueError(
                f"position {int(positions.max())} exceeds max_position_embeddings={limit}"
            )
        return self.embed_positions(positions)


class ASAForCausalLM(ASAPreTrainedModel, GenerationMixin):
    """ASAModel plus the output layer (tied to the embeddings when tie_word_embeddings)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ASAConfig) -> None:
        super().__init__(config)
        self.model = ASAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: Tensor | None = None,
        past_key_values: ASACache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        cache: ASACache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [B, T (or logits_to_keep), vocab]; with labels [B, T], the mean next-token
        loss over labels != -100. kwargs: what generate passes besides (return_dict, ...)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=given_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)}
        )
