"""Tomogram files in and out: formats, voxel sizes, crash-safe writes, memory of large volumes.

Lowest layer: imports ``scripts.options`` only, never the network or a workflow.
"""
