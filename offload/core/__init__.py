"""The model-agnostic core: host memory, placement, layerwise streaming, the offload manager, the denoising loop.

Imports nothing from ``weights``, ``distributed`` or any model family: what it needs of a model comes through the
spec (``spec.py``) and the model source it is handed.
"""
