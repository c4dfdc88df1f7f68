"""Tomogram files in and out: formats, voxel sizes, crash-safe writes, sinks, memory of large volumes.

Modules: ``volume`` (read and write MRC, TIFF, NIfTI), ``omezarr`` (OME-Zarr folders, behind
``volume``), ``readers`` (MONAI ImageReaders), ``sinks`` (the Sink protocol), ``atomic`` (crash-safe
renames, output-folder checks), ``pages`` (page release),
``diskspace`` (free-space checks, reserved blocks), ``locks`` (per-tomogram locks), ``labels`` (the
label convention, read and checked one way everywhere), ``weights_metadata`` (the JSON sidecar that
says what a weights file was trained on, read and written by inference and training alike).

Lowest layer: imports nothing from the rest of the bundle.
"""
