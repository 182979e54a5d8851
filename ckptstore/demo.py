"""`ckptstore demo`: a tiny CPU training run that shows what the store does.

Trains a small MLP, saving model + optimizer every step; then re-saves an existing step
(StepExistsError, nothing touched), overwrites it atomically, resumes from the latest step
into a fresh model and optimizer, and lists the store. `resume` is the code to copy: it
restores the optimizer too (Adam's moments and step counts), not just the weights.
"""

from __future__ import annotations

from typing import Any

import ckptstore
from ckptstore.display import human_bytes, print_steps


def _make_model() -> tuple[Any, Any]:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(256, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1))
    # The first layer is frozen, as with a fine-tuned backbone: its chunks dedupe across steps.
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    return model, optimizer


def _state(model: Any, optimizer: Any, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}


def resume(store: Any, step: int | None = None) -> tuple[Any, Any, int]:
    """A fresh model and optimizer holding the weights and optimizer state saved as `step`
    (default: the latest), and that step. The weights are loaded in place into the model's
    own tensors (strict: every saved weight, no other). The optimizer's state (exp_avg,
    exp_avg_sq and step of every parameter) is loaded on its own and handed to
    `load_state_dict`: a fresh AdamW has no state tensors to fill yet, and resuming without
    it would silently restart Adam's moments."""
    model, optimizer = _make_model()
    step = store.latest() if step is None else step  # one step for both loads, even if a save lands between
    store.load(step, select=["model"], into={"model": model.state_dict()})
    optimizer.load_state_dict(store.load(step, select=["optim"])["optim"])
    return model, optimizer, step


def run_demo(directory: str, *, steps: int = 6) -> None:
    """Run the demo against the store at `directory` (created if missing)."""
    import torch

    torch.manual_seed(0)
    store = ckptstore.open(directory)
    model, optimizer = _make_model()
    inputs = torch.randn(512, 256)
    targets = inputs[:, :1] * 3 - 1
    try:
        start = store.latest()
    except ckptstore.StoreNotFoundError:  # nothing saved here yet: the first save creates the store
        start = None
    first = 0 if start is None else start + 1
    if start is not None:
        model, optimizer, _ = resume(store, start)
        print(f"resuming from step {start} in {store.url} (model and optimizer state)")
    print(f"training steps {first}..{first + steps - 1}, saving every step to {store.url}")
    for step in range(first, first + steps):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        info = store.save(step, _state(model, optimizer, step), metadata={"loss": loss.item()})
        print(f"  step {step}: loss {loss.item():.4f}, {human_bytes(info.logical_bytes)} state, "
              f"{human_bytes(info.new_bytes)} new ({info.new_chunks}/{info.chunks} chunks written)")

    last = first + steps - 1
    try:
        store.save(last, _state(model, optimizer, last))
    except ckptstore.StepExistsError as exc:
        print(f"re-saving step {last} without overwrite -> StepExistsError: {exc}")
    info = store.save(last, _state(model, optimizer, last), overwrite=True, metadata={"note": "overwritten"})
    print(f"overwrite=True -> step {last} replaced atomically (seq {info.seq}, replaced manifest "
          f"{(info.replaced or '')[:12]}...)")

    fresh_model, fresh_optimizer, resumed_step = resume(store)
    same_weights = _same(model.state_dict(), fresh_model.state_dict())
    same_optimizer = _same(optimizer.state_dict(), fresh_optimizer.state_dict())
    print(f"resumed from latest step {resumed_step} into a fresh model and optimizer: "
          f"weights identical = {same_weights}, optimizer state identical = {same_optimizer}")
    if not (same_weights and same_optimizer):
        raise RuntimeError("demo: the resumed model or optimizer differs from the trained one")
    print()
    print_steps(directory, as_json=False)


def _same(a: Any, b: Any) -> bool:
    """Whether two state dicts hold the same keys, plain values and tensors, exactly."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
