"""The VTAB-1k protocol done right: choose hyper-parameters on train800 -> val200, retrain the choice on
train800val200, read the test set once. Nothing is ever chosen on test accuracy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

# run(hparams, train_split, eval_split) -> a result dict holding at least "accuracy".
RunFn = Callable[[dict[str, Any], str, str], dict[str, Any]]


@dataclass
class Selection:
    best: dict[str, Any]
    val_accuracy: float | None  # None when there was nothing to choose
    grid: list[dict[str, Any]] = field(default_factory=list)  # every candidate with its validation accuracy
    final: dict[str, Any] = field(default_factory=dict)  # the retrained run's result, with its test accuracy


def select_then_test(run: RunFn, grid: Sequence[dict[str, Any]], train: str = "train800", val: str = "val200",
                     trainval: str = "train800val200", test: str = "test") -> Selection:
    """Pick the candidate with the best validation accuracy (ties: the earlier one in ``grid``), retrain it on
    ``trainval`` and evaluate it once on ``test``. A single candidate needs no validation run."""
    if not grid:
        raise ValueError("empty hyper-parameter grid")
    if len(grid) == 1:
        return Selection(dict(grid[0]), None, [dict(grid[0])], run(dict(grid[0]), trainval, test))
    scored = []
    for hp in grid:
        acc = run(dict(hp), train, val)["accuracy"]
        scored.append({**hp, "val_accuracy": acc})
    best_i = max(range(len(grid)), key=lambda i: (scored[i]["val_accuracy"], -i))
    final = run(dict(grid[best_i]), trainval, test)
    return Selection(dict(grid[best_i]), scored[best_i]["val_accuracy"], scored, final)
