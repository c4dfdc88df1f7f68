"""Segmenting tomograms slice by slice: prediction, post-processing, output files, ranks.

Imports ``scripts.network``, ``scripts.io``, ``scripts.options`` and ``scripts.reconstruction``; never
``train`` or ``surfaces``.
"""
