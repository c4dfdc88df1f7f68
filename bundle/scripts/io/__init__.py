"""Tomogram files in and out: formats, voxel sizes, crash-safe writes, sinks, memory of large volumes.

Lowest layer: imports nothing from the rest of the bundle.
"""
