"""Benchmarks of ckptstore against raw I/O, torch.save, safetensors, DCP and S3 peers.

Run `python -m benchmarks --help` (from the repository root); see benchmarks/README.md.
"""
