"""Semi-supervised training: training-folder layout, slice loading, engine, losses, metrics, handlers.

Imports ``scripts.network``, ``scripts.io`` and ``scripts.options``; never ``infer`` or ``surfaces``.
"""
