"""`ckptstore demo`: a tiny CPU training run that shows what the store does.

Trains a small MLP, saving model + optimizer every step; then re-saves an existing step
(StepExistsError, nothing touched), overwrites it atomically, resumes from the latest step
into a fresh model, and lists the store.
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
        store.load(start, into=_state(model, optimizer, start))
        print(f"resuming from step {start} in {store.url}")
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

    fresh_model, fresh_optimizer = _make_model()
    resumed = store.load(into=_state(fresh_model, fresh_optimizer, -1))
    fresh_optimizer.load_state_dict(resumed["optim"])
    trained, restored = model.state_dict().values(), fresh_model.state_dict().values()
    same = all(torch.equal(a, b) for a, b in zip(trained, restored, strict=True))
    print(f"resumed from latest step {resumed['step']} into a fresh model: weights identical = {same}")
    if not same:
        raise RuntimeError("demo: resumed weights differ from the trained ones")
    print()
    print_steps(directory, as_json=False)
