"""The model: its configuration, the BitNet quantizers and the Flax Linen transformer.

`config` (BitNetConfig and presets), `quant` (absmean / absmax quantizers, their straight-through
gradients, the exact integer BitLinear product), `transformer` (BitNetLM and its layers, for
training and, given a ServingSpec, for serving packed weights).
"""
