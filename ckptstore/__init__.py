"""ckptstore: a checkpoint store for ML training with atomic, deduplicated commits.

    store = ckptstore.open("./ckpts")
    store.save(100, state)                 # StepExistsError if step 100 exists
    store.save(100, state, overwrite=True) # atomic replace
    state = store.load()                   # latest step

Importing this package does not import torch, numpy or any cloud SDK.
"""

from ckptstore.chunkblob import Compression
from ckptstore.chunking import ChunkingPolicy
from ckptstore.errors import (
    AlreadyExistsError,
    BackendError,
    ChunkVanishedError,
    CkptStoreError,
    CommitConflictError,
    ConditionalWritesUnsupportedError,
    DistributedSaveError,
    EpochContentionError,
    FormatError,
    GCLockLostError,
    IncompatibleStoresError,
    InsufficientMemoryError,
    IntegrityError,
    InteropError,
    InvalidArgumentError,
    InvalidKeyError,
    InvalidStepError,
    InvalidURLError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    PermissionDeniedError,
    PreconditionFailedError,
    StateConflictError,
    StateMismatchError,
    StepExistsError,
    StepNotFoundError,
    StoreNotFoundError,
    TagExistsError,
    TagNotFoundError,
    TransientError,
    UnsupportedFormatError,
    UnsupportedValueError,
)
from ckptstore.stepreader import ReaderClosedError, StepReader, TensorInfo, TensorNotFoundError, TensorSlice
from ckptstore.store import SaveInfo, StepInfo, Store, open

__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError",
    "BackendError",
    "ChunkVanishedError",
    "ChunkingPolicy",
    "CkptStoreError",
    "CommitConflictError",
    "Compression",
    "ConditionalWritesUnsupportedError",
    "DistributedSaveError",
    "EpochContentionError",
    "FormatError",
    "GCLockLostError",
    "IncompatibleStoresError",
    "IntegrityError",
    "InteropError",
    "InvalidArgumentError",
    "InvalidKeyError",
    "InvalidStepError",
    "InvalidURLError",
    "ObjectNotFoundError",
    "ObjectTooLargeError",
    "PermissionDeniedError",
    "PreconditionFailedError",
    "ReaderClosedError",
    "SaveInfo",
    "StateConflictError",
    "InsufficientMemoryError",
    "StateMismatchError",
    "StepExistsError",
    "StepInfo",
    "StepNotFoundError",
    "StepReader",
    "Store",
    "StoreNotFoundError",
    "TagExistsError",
    "TagNotFoundError",
    "TensorInfo",
    "TensorNotFoundError",
    "TensorSlice",
    "TransientError",
    "UnsupportedFormatError",
    "UnsupportedValueError",
    "__version__",
    "open",
]
