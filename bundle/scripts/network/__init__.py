"""The double-decoder network: its modules, the fused inference copy, weights files, export.

Imports ``scripts.io`` only (atomic writes); never a workflow package.
"""
