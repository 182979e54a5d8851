"""Trainer integrations: import the module of your trainer.

- `ckptstore.integrations.lightning`: `StoreCheckpointIO` (Lightning's default, single-device
  and DDP strategies) and `StoreModelParallelStrategy` (FSDP2); extra `ckptstore[lightning]`.
- `ckptstore.integrations.transformers`: `StoreCallback` and `restore_checkpoint` (Hugging Face
  Trainer); extra `ckptstore[transformers]`.
- `ckptstore.integrations.olmo_core`: OLMo-core's checkpointing; extra `ckptstore[olmo-core]`.
- `ckptstore.integrations.torchtitan`: torchtitan's CheckpointManager; extra `ckptstore[torchtitan]`.

Importing this package imports no trainer; each submodule imports its own trainer's package.
See docs/INTEGRATIONS.md.
"""
