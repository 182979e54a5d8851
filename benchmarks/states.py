"""Transformer-like state dicts of a chosen size, built the same way in every process.

A state is described by a small JSON-able spec so each measured subprocess can rebuild
exactly the same tensors (same shapes, same bytes) without reading anything from disk:
reading a prepared file would warm the page cache the loads are supposed to miss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: GPT-style context length: the learned position embedding has this many rows.
POSITIONS = 1024


@dataclass(frozen=True)
class StateSpec:
    """`model_bytes` of parameters in `dtype`; `adam` adds exp_avg, exp_avg_sq and step."""

    model_bytes: int
    dtype: str = "float32"  # "float32" or "bfloat16"
    adam: bool = False
    seed: int = 0

    @property
    def label(self) -> str:
        kind = "model+adam" if self.adam else "model"
        dt = {"float32": "fp32", "bfloat16": "bf16"}[self.dtype]
        return f"{kind} {dt}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> StateSpec:
        return StateSpec(**data)


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2}[dtype]


def model_shapes(model_bytes: int, dtype: str) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a GPT-2-like decoder whose parameters fill ~model_bytes.

    The width is the largest that still gives at least 12 layers (smaller states fall back to
    fewer layers); the vocabulary absorbs the remainder so the total lands near the target.
    """
    params = max(1, model_bytes // _itemsize(dtype))
    chosen = (64, 1)
    for width in (2048, 1600, 1280, 1024, 768, 512, 384, 256, 128, 64):
        per_layer = 12 * width * width + 13 * width
        layers = (params - POSITIONS * width) // per_layer
        if layers >= 12:
            chosen = (width, int(layers))
            break
        if layers >= 1 and chosen == (64, 1):
            chosen = (width, min(int(layers), 12))
    width, layers = chosen
    layers = min(layers, 96)
    rest = params - layers * (12 * width * width + 13 * width) - POSITIONS * width - 2 * width
    vocab = max(16, rest // width)
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("wte.weight", (vocab, width)),
        ("wpe.weight", (POSITIONS, width)),
    ]
    for i in range(layers):
        p = f"h.{i}."
        shapes += [
            (p + "ln_1.weight", (width,)), (p + "ln_1.bias", (width,)),
            (p + "attn.c_attn.weight", (3 * width, width)), (p + "attn.c_attn.bias", (3 * width,)),
            (p + "attn.c_proj.weight", (width, width)), (p + "attn.c_proj.bias", (width,)),
            (p + "ln_2.weight", (width,)), (p + "ln_2.bias", (width,)),
            (p + "mlp.c_fc.weight", (4 * width, width)), (p + "mlp.c_fc.bias", (4 * width,)),
            (p + "mlp.c_proj.weight", (width, 4 * width)), (p + "mlp.c_proj.bias", (width,)),
        ]
    shapes += [("ln_f.weight", (width,)), ("ln_f.bias", (width,))]
    return shapes


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _fill(shape: tuple[int, ...], seed: int, scale: float, offset: float, dtype: Any, positive: bool = False) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    if positive:
        t.abs_()
    t.mul_(scale).add_(offset)
    return t.to(dtype) if dtype != torch.float32 else t


def build_state(spec: StateSpec) -> dict[str, Any]:
    """The state: {"model": {name: tensor}} and, with adam, {"optim": {"state": ..., "param_groups": ...}}.

    Values are random like trained weights (norm weights near 1, the rest ~N(0, 0.02)), so
    compression sees realistic floats rather than zeros.
    """
    import torch

    dtype = _torch_dtype(spec.dtype)
    model: dict[str, Any] = {}
    for i, (name, shape) in enumerate(model_shapes(spec.model_bytes, spec.dtype)):
        is_norm_weight = name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name == "ln_f.weight"
        model[name] = _fill(shape, spec.seed * 1_000_003 + i, 0.02, 1.0 if is_norm_weight else 0.0, dtype)
    state: dict[str, Any] = {"model": model}
    if spec.adam:
        opt_state: dict[str, Any] = {}
        for i, (name, tensor) in enumerate(model.items()):
            base = spec.seed * 1_000_003 + 500_000 + 2 * i
            opt_state[name] = {
                "step": torch.tensor(1000.0),  # torch.optim.Adam keeps step as a float32 scalar tensor
                "exp_avg": _fill(tuple(tensor.shape), base, 1e-3, 0.0, dtype),
                "exp_avg_sq": _fill(tuple(tensor.shape), base + 1, 1e-6, 0.0, dtype, positive=True),
            }
        state["optim"] = {
            "state": opt_state,
            "param_groups": [{"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                              "amsgrad": False, "params": list(model)}],
        }
    return state


def empty_like_state(state_or_spec: Any) -> Any:
    """Same tree with every tensor replaced by an uninitialised one (targets of in-place loads)."""
    import torch

    if isinstance(state_or_spec, StateSpec):
        return empty_like_state(_shapes_only(state_or_spec))
    if isinstance(state_or_spec, dict):
        return {k: empty_like_state(v) for k, v in state_or_spec.items()}
    if isinstance(state_or_spec, list):
        return [empty_like_state(v) for v in state_or_spec]
    if isinstance(state_or_spec, torch.Tensor):
        return torch.empty_like(state_or_spec)
    if isinstance(state_or_spec, _Shape):
        return torch.empty(state_or_spec.shape, dtype=state_or_spec.dtype)
    return state_or_spec


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]
    dtype: Any


def _shapes_only(spec: StateSpec) -> dict[str, Any]:
    """The state's tree with shapes instead of data: allocating targets costs no random fill."""
    import torch

    dtype = _torch_dtype(spec.dtype)
    model = {name: _Shape(shape, dtype) for name, shape in model_shapes(spec.model_bytes, spec.dtype)}
    state: dict[str, Any] = {"model": model}
    if spec.adam:
        state["optim"] = {
            "state": {name: {"step": _Shape((), torch.float32), "exp_avg": s, "exp_avg_sq": s}
                      for name, s in model.items()},
            "param_groups": [{"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                              "amsgrad": False, "params": list(model)}],
        }
    return state


def tensors(state: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, tensor) for every tensor in the tree, in tree order."""
    import torch

    out: list[tuple[str, Any]] = []
    if isinstance(state, dict):
        for k, v in state.items():
            out += tensors(v, f"{prefix}{k}.")
    elif isinstance(state, list):
        for i, v in enumerate(state):
            out += tensors(v, f"{prefix}{i}.")
    elif isinstance(state, torch.Tensor):
        out.append((prefix[:-1], state))
    return out


def state_bytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for _, t in tensors(state))


def change_tenth(state: Any) -> int:
    """Change 10% of the tensors (by count; a fixed pseudo-random sample, the same in every
    process) by flipping their sign; returns the bytes that changed.

    A sample rather than "every 10th": with 12 tensors per layer, every 10th would pick only
    biases and change almost no bytes.
    """
    import random

    leaves = tensors(state)
    picked = random.Random(12345).sample(range(len(leaves)), max(1, round(len(leaves) / 10)))
    changed = 0
    for i in picked:
        t = leaves[i][1]
        t.neg_()
        if t.numel() and not bool((t == 0).all()):
            changed += t.numel() * t.element_size()
    return changed
