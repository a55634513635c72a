"""Bottom layer: errors, atomic file helpers, names, the adapter format, time, the runner.

Imports nothing else of this package.
"""
