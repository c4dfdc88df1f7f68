"""Semi-supervised training: label convention, folder layout, slice loading, engine, losses, metrics,
the handlers the configs attach.

Imports ``scripts.io``, ``scripts.options`` and ``scripts.reconstruction`` (the network comes from the
config); never ``infer`` or ``surfaces``.
"""
