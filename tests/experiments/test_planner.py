"""The planner's stacking: which selection trials share a stack."""
from __future__ import annotations

from qtune.experiments.planner import groups
from qtune.experiments.store import Trial


def _trial(key: str, method: str, options: dict, **train) -> Trial:
    return Trial(key, "t", method, "fold", 0, 0, 0, {"method": method, "options": options,
                                                     "train": {"device": "cpu", "epochs": 3, **train}})


def test_stacks_only_where_stacking_pays():
    trials = [_trial("a", "vqt", {"tokens": 1}, lr=0.1), _trial("b", "vqt", {"tokens": 1}, lr=0.01),
              _trial("c", "vqt", {"tokens": 2}), _trial("d", "vqt", {"tokens": 1}, epochs=4),
              _trial("e", "dtl_plus", {}, lr=0.1), _trial("f", "dtl_plus", {}, lr=0.01),
              _trial("g", "lst", {}), _trial("h", "lst", {}, lr=0.1), _trial("i", "bitfit", {})]
    cut = sorted(sorted(t.key for t in g) for g in groups(trials).values())
    # VQT stacks by structure and shared schedule; DTL+ and LST run alone on a CPU (vmap would loop over them),
    # so the workers spread them; a stream method always trains alone
    assert cut == [["a", "b"], ["c"], ["d"], ["e"], ["f"], ["g"], ["h"], ["i"]]
