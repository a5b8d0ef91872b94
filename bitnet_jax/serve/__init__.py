"""Serving a trained model: packing, generation and chat.

`pack` (training parameters -> packed parameters, and the packed folder format), `generate`
(jitted prefill + decode with a KV cache), `chat`, `host_memory`.
"""
