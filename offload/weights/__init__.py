"""Weights on disk: the one safetensors reader, dtype rules, and the format adapters (Diffusers folders).

Imports nothing from any model family: a format adapter is told by a family's spec which components to expect.
"""
