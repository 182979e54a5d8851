"""Test kit shipped with ckptstore: the backend conformance suite and multi-process scenarios.

Not imported by `import ckptstore`; it needs pytest (the `test` extra).
"""
