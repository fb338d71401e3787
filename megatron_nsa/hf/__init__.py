"""Hugging Face export of ASA models (needs the `hf` extra: transformers, safetensors).

- `export_hf(load, out, ...)`: Megatron `torch_dist` checkpoint -> Hugging Face folder
  (`megatron-nsa export-hf`); `import_hf(load, out, ...)`: back, at a chosen TP/PP layout
  (`megatron-nsa import-hf`). Both raise `ConversionError` on bad input.
- configuration_asa.py, modeling_asa.py, asa_layers.py, asa_cache.py, asa_ops.py: the
  model code copied into every exported folder (self-contained: torch and transformers).
- kv_cache: what the latent cache holds, next to NSA and full attention.

See docs/hf_export.md.
"""

from .errors import ConversionError
from .export import export_hf
from .import_hf import import_hf

__all__ = ["ConversionError", "export_hf", "import_hf"]
