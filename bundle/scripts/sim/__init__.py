"""The cryo-SXT simulator (phantom cells, tilt series, reconstruction); leaves the bundle next step.

Imports ``scripts.io`` only.
"""
