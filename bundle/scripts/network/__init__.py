"""The double-decoder network: its modules, the fused inference copy, weights files, export.

Imports ``scripts.io`` (atomic writes) and ``scripts.options``; never a workflow package.
"""
