"""Segmenting tomograms slice by slice: prediction, post-processing, output files, ranks.

Imports ``scripts.network``, ``scripts.io`` and ``scripts.options``; never ``train`` or ``surfaces``.
"""
