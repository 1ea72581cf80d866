"""Legacy Doge generations (G1..G4): layouts, config, our PyTorch reference, loading, export pieces.

Kept import-light: wrappers.py imports legacy.layouts at module level.
"""
