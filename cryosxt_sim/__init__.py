"""Simulated cryo-SXT tomograms with exact membrane ground truth, for the demo, tests and benchmarks.

A package of its own beside the MONAI bundle: segmenting never needs it, so the bundle does not ship
it. ``python -m cryosxt_sim --help`` (or the ``cryosxt-sim`` command) writes tomograms in the
training-folder layout; ``cryosxt_sim.simulate.simulate_tomogram`` is the API. Modules:
``instruments`` (presets, the ``random`` draw, the held-out corner), ``kinds`` (cell kinds,
per-tomogram sample settings), ``geometry`` (signed distances, painting), ``phantom`` (cell builder,
absorption map, ground truth), ``yeast`` (walled cells, vacuoles), ``support`` (carbon film),
``granules``, ``tomography`` (projection, acquisition, reconstruction), ``simulate`` (API, files),
``bundle_io`` (how files are written).
"""
