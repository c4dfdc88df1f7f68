"""Masks to objects, surfaces, measurements in nanometres and pictures.

Imports ``scripts.io`` and ``scripts.options``; never the network, ``train`` or ``infer``.
"""
