"""Trainer integrations: import the module of your trainer, e.g.
`from ckptstore.integrations.lightning import StoreCheckpointIO`.

Importing this package imports no trainer; each submodule imports its own trainer's package
(install it with the matching extra, e.g. `pip install 'ckptstore[lightning]'`).
See docs/INTEGRATIONS.md.
"""
