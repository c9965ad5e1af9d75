"""The papers' per-task settings and training recipes, as named presets: ``synqt:vtab/dsprites_loc``.

- SynQT: tokens n, s' (attention scale), s'' (FFN scale) and f (feature scale) per VTAB-1k task, from the authors'
  released ``configs/vit_21k/<task>.yaml`` (the outcome of their search; their ``train.py`` reads only these four
  keys). Recipe: AdamW, lr 1e-3, wd 1e-2 on every trainable tensor, batch 64, 50 epochs, 10 warmup epochs from 0,
  half-cycle cosine to 1e-6, stepped every iteration (paper section 4 and the authors' ``train.py``). Search space
  of the paper: n in {1, 4, 16}, s' and s'' in {0.1, 1}.
- VQT: query tokens per VTAB-1k task from the authors' ``run_demo_exp.sh`` (1; 10 for sNORB-elevation and
  Clevr-distance; 20 for SVHN, DMLab, dSprites-location, sNORB-azimuth, KITTI). Recipe: Adam (weight decay coupled
  into the gradient), batch 128, 100 epochs, 10 warmup epochs, cosine; grid lr in {1, 0.5, 0.25, 0.1, 0.05} x 128/256
  and wd in {1e-2, 1e-3, 1e-4, 0}, chosen on train800 -> val200.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Any

from ..errors import ConfigError

# task: (tokens, attn_scale s', ffn_scale s'', feat_scale f)
SYNQT_VTAB: dict[str, tuple[int, float, float, float]] = {
    "cifar": (4, 1.0, 0.1, 0.1),
    "caltech101": (4, 0.1, 0.1, 1.0),
    "dtd": (1, 0.1, 0.1, 0.1),
    "oxford_flowers102": (4, 0.1, 0.1, 0.1),
    "oxford_iiit_pet": (1, 0.1, 1.0, 1.0),
    "svhn": (4, 0.1, 1.0, 1.0),
    "sun397": (1, 1.0, 0.1, 0.1),
    "patch_camelyon": (16, 0.1, 1.0, 0.1),
    "eurosat": (16, 1.0, 0.1, 0.1),
    "resisc45": (4, 0.1, 0.1, 0.1),
    "diabetic_retinopathy": (16, 1.0, 0.1, 0.1),
    "clevr_count": (16, 0.1, 0.1, 0.1),
    "clevr_dist": (16, 0.1, 0.1, 0.1),
    "dmlab": (1, 0.1, 0.1, 1.0),
    "kitti": (16, 1.0, 0.1, 0.1),
    "dsprites_loc": (16, 0.1, 0.1, 0.1),
    "dsprites_ori": (4, 0.1, 0.1, 1.0),
    "smallnorb_azi": (16, 0.1, 1.0, 1.0),
    "smallnorb_ele": (16, 1.0, 0.1, 0.1),
}
VQT_TOKENS: dict[str, int] = {name: 1 for name in SYNQT_VTAB} | {
    "smallnorb_ele": 10, "clevr_dist": 10,
    "svhn": 20, "dmlab": 20, "dsprites_loc": 20, "smallnorb_azi": 20, "kitti": 20,
}

# decay_all: the authors' AdamW decays every trainable tensor (biases, norms and the scales s', s'', f too).
SYNQT_RECIPE: dict[str, Any] = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-2, "batch_size": 64,
                                "epochs": 50, "warmup_epochs": 10, "min_lr": 1e-6, "decay_all": True}
VQT_RECIPE: dict[str, Any] = {"optimizer": "adam", "lr": 0.125, "weight_decay": 1e-4, "batch_size": 128,
                              "epochs": 100, "warmup_epochs": 10, "min_lr": 0.0}
# Each method's own training recipe, which `qtune train` starts from (flags override it): the papers' (or their
# authors' code's) optimiser, batch, epochs and decay; where a paper searches the lr, a point of its grid. A method
# not listed trains with TrainConfig's defaults, which are SynQT's recipe.
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "synqt": ("SynQT paper", SYNQT_RECIPE),
    "vqt": ("VQT paper, lr 0.25 x 128/256 of its grid", VQT_RECIPE),
    # VPT's linear-probe protocol (the demo's): lr 1e-2 of the demo's grid {1e-2, 1e-3}
    "linear": ("linear probe (VPT's protocol)", {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.0,
                                                 "batch_size": 64, "epochs": 50, "warmup_epochs": 10}),
    # VPT: momentum SGD, 100 epochs with 10 of warmup, base lr 1.0 x 64/256 of its grid
    **{m: ("VPT paper", {"optimizer": "sgd", "lr": 0.25, "weight_decay": 1e-4, "batch_size": 64, "epochs": 100,
                         "warmup_epochs": 10}) for m in ("vpt_shallow", "vpt_deep")},
    # Head2Toe's authors: Adam at batch 128, no decay
    "head2toe": ("Head2Toe authors' code", {"optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0, "batch_size": 128,
                                            "epochs": 50, "warmup_epochs": 5}),
    # DTL's authors: AdamW, batch 32, weight decay 0.05, 100 epochs
    **{m: ("DTL authors' code", {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "batch_size": 32,
                                 "epochs": 100, "warmup_epochs": 10}) for m in ("dtl", "dtl_plus")},
}


def method_recipe(method: str) -> tuple[str, dict[str, Any]]:
    """(where it comes from, TrainConfig fields) of ``method``'s own recipe; ({}) where it has none of its own."""
    source, train = RECIPES.get(method.lower(), ("qtune's default, SynQT's recipe", {}))
    return source, dict(train)


SYNQT_SEARCH: tuple[dict[str, Any], ...] = tuple(
    {"tokens": n, "attn_scale": a, "ffn_scale": f} for n, a, f in product((1, 4, 16), (0.1, 1.0), (0.1, 1.0)))
VQT_GRID: tuple[dict[str, Any], ...] = tuple(
    {"lr": lr * 128 / 256, "weight_decay": wd}
    for lr, wd in product((1.0, 0.5, 0.25, 0.1, 0.05), (1e-2, 1e-3, 1e-4, 0.0)))


@dataclass(frozen=True)
class Preset:
    """A method with a paper's options for one task, its training recipe and its hyper-parameter grid."""

    name: str
    method: str
    options: dict[str, Any]
    train: dict[str, Any]  # TrainConfig fields
    grid: tuple[dict[str, Any], ...] = field(default=())  # TrainConfig fields searched on validation data


def _synqt(task: str) -> Preset:
    n, s1, s2, f = SYNQT_VTAB[task]
    return Preset(f"synqt:vtab/{task}", "synqt", {"tokens": n, "attn_scale": s1, "ffn_scale": s2, "feat_scale": f},
                  dict(SYNQT_RECIPE), ({"lr": 1e-3, "weight_decay": 1e-2},))


def _vqt(task: str) -> Preset:
    return Preset(f"vqt:vtab/{task}", "vqt", {"tokens": VQT_TOKENS[task]}, dict(VQT_RECIPE), VQT_GRID)


_BUILDERS = {"synqt": _synqt, "vqt": _vqt}


def preset_names() -> list[str]:
    return [f"{m}:vtab/{t}" for m in _BUILDERS for t in SYNQT_VTAB]


def get_preset(name: str) -> Preset:
    """``METHOD:vtab/TASK``; VTAB task aliases (``dsprites_location``, ``pets``, ...) are accepted."""
    from ..data.layouts import VTAB_TASKS

    method, sep, rest = name.strip().lower().partition(":")
    suite, slash, task = rest.partition("/")
    aliases = {a: t.name for t in VTAB_TASKS.values() for a in (t.name, *t.aliases)}
    if not sep or not slash or method not in _BUILDERS or suite != "vtab" or task not in aliases:
        raise ConfigError(f"unknown preset {name!r}: expected METHOD:vtab/TASK with METHOD in "
                          f"{', '.join(_BUILDERS)} and TASK one of {', '.join(SYNQT_VTAB)}")
    return _BUILDERS[method](aliases[task])
