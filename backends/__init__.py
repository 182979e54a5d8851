"""Storage backends: byte-level get/put/head/list/delete on keys, nothing about checkpoints.

Installed as ``ckptstore.backends``. Each backend module imports its SDK lazily, so
importing this package costs nothing.
"""

from ckptstore.backends.base import Backend, GetResult, ObjectInfo, PutMode

__all__ = ["Backend", "GetResult", "ObjectInfo", "PutMode"]
