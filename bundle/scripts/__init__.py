"""The bundle's code, one sub-package per concern, layered bottom to top (docs/architecture.md).

- ``options``: command-line strings -> typed values; imports nothing of the bundle.
- ``cli``: command-line runs end on one ``ERROR:`` line naming the file and the problem; imports
  nothing of the bundle.
- ``io``: tomogram files (MRC, TIFF, NIfTI), crash-safe writes, sinks, page release.
- ``network``: the double-decoder network, its fused inference copy, weights files, export.
- ``train``, ``infer``, ``surfaces``: the three workflows the configs run.

A package imports only packages listed above it here (``train``, ``infer`` and ``surfaces`` never
import each other), so the lower layers can be read and tested on their own.
"""
