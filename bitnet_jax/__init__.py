"""bitnet-jax: BitNet b1.58 ternary language models in JAX.

Public API:
  BitNetConfig   the architecture and quantization of a model (frozen, validated)
  BitNetLM       the Flax Linen model: `BitNetLM(config).apply({"params": p}, ids)` -> logits
  init_params    fresh parameters for training from scratch
  load_hf        read a local Hugging Face BitNet folder -> (config, params)
  load_gguf      read a bitnet.cpp / llama.cpp BitNet GGUF file -> (config, packed params)
  load_model     a run, packed or Hugging Face folder or a GGUF file -> (config, params, tokenizer)
  export_hf      write a folder that transformers' BitNetForCausalLM loads
  generate       jitted prefill + decode loop with a KV cache -> new token ids
  pack           training parameters -> packed serving parameters (2-bit ternary, int8 lm_head)
  unpack         packed parameters -> training parameters that quantize back to the same codes
  BitNetError    the error raised for bad input, with a message meant for people
"""

from bitnet_jax.errors import BitNetError
from bitnet_jax.interop.gguf import load_gguf
from bitnet_jax.interop.hf import load_hf
from bitnet_jax.interop.hf_export import export_hf
from bitnet_jax.model.config import PRESETS, BitNetConfig
from bitnet_jax.model.transformer import BitNetLM, KVCache, init_params
from bitnet_jax.serve.generate import generate
from bitnet_jax.serve.load import load_model
from bitnet_jax.serve.pack import pack, unpack
from bitnet_jax.serve.packed_folder import load_packed, save_packed

__all__ = [
    "PRESETS",
    "BitNetConfig",
    "BitNetError",
    "BitNetLM",
    "KVCache",
    "export_hf",
    "generate",
    "init_params",
    "load_gguf",
    "load_hf",
    "load_model",
    "load_packed",
    "pack",
    "save_packed",
    "unpack",
]
__version__ = "0.1.0"
