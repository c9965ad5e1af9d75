"""The papers' per-task presets: every VTAB-1k task has one per method, values as in docs/methods.md, CLI precedence."""
import pytest

from qtune.cli import _method_and_config, build_parser
from qtune.data.layouts import VTAB_TASKS
from qtune.engine.config import TrainConfig
from qtune.errors import ConfigError
from qtune.methods import get_method
from qtune.methods.presets import SYNQT_VTAB, VQT_GRID, get_preset, preset_names


def test_every_vtab_task_has_a_synqt_and_a_vqt_preset():
    assert set(SYNQT_VTAB) == set(VTAB_TASKS)
    assert len(preset_names()) == 2 * len(VTAB_TASKS)
    for name in preset_names():
        p = get_preset(name)
        TrainConfig(**p.train)  # a valid schedule
        assert p.grid


def test_synqt_values_match_the_authors_configs():
    p = get_preset("synqt:vtab/dsprites_loc")
    assert p.options == {"tokens": 16, "attn_scale": 0.1, "ffn_scale": 0.1, "feat_scale": 0.1}
    assert get_preset("synqt:vtab/oxford_iiit_pet").options == {"tokens": 1, "attn_scale": 0.1, "ffn_scale": 1.0,
                                                                 "feat_scale": 1.0}
    assert p.train == {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-2, "batch_size": 64, "epochs": 50,
                       "warmup_epochs": 10, "min_lr": 1e-6, "decay_all": True}


def test_vqt_tokens_and_grid():
    assert get_preset("vqt:vtab/dsprites_location").options == {"tokens": 20}  # aliases resolve
    assert get_preset("vqt:vtab/clevr_dist").options == {"tokens": 10}
    assert get_preset("vqt:vtab/cifar").options == {"tokens": 1}
    assert len(VQT_GRID) == 20 and {g["lr"] for g in VQT_GRID} == {0.5, 0.25, 0.125, 0.05, 0.025}
    assert get_preset("vqt:vtab/cifar").train["optimizer"] == "adam"


@pytest.mark.parametrize("bad", ["synqt", "synqt:vtab/imagenet", "lora:vtab/cifar", "synqt:fgvc/cifar"])
def test_unknown_presets_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset(bad)


def _args(*extra):
    return build_parser().parse_args(["train", "--backbone", "x", "--train", "t", "--out", "o", *extra])


def test_cli_flags_override_the_preset_which_overrides_the_defaults():
    from qtune.methods.presets import method_recipe

    method, options, cfg, recipe = _method_and_config(_args("--preset", "synqt:vtab/clevr_count", "-O", "tokens=2",
                                                            "--epochs", "3"))
    assert method == "synqt" and options["tokens"] == "2" and options["feat_scale"] == 0.1
    assert get_method("synqt").config_class.from_dict(options).tokens == 2  # typed by the method's config
    # the authors' optimiser: decay on every tensor, unless a flag says otherwise
    assert cfg.epochs == 3 and cfg.warmup_epochs == 10 and cfg.decay_all and recipe == "synqt:vtab/clevr_count preset"
    assert not _method_and_config(_args("--preset", "synqt:vtab/clevr_count", "--no-decay-all"))[2].decay_all
    method, options, cfg, _ = _method_and_config(_args("--method", "vqt", "--preset", "vqt:vtab/svhn"))
    assert options == {"tokens": 20} and cfg.batch_size == 128 and cfg.optimizer == "adam"
    _, _, cfg, recipe = _method_and_config(_args("--method", "linear"))  # the method's own recipe
    assert cfg == TrainConfig(**method_recipe("linear")[1]) and cfg.lr == 1e-2 and recipe.startswith("linear's own")
    _, _, cfg, recipe = _method_and_config(_args("--method", "bitfit", "--lr", "0.1"))  # no recipe of its own
    assert cfg == TrainConfig(lr=0.1) and "qtune's default" in recipe
    with pytest.raises(ConfigError, match="conflicts"):
        _method_and_config(_args("--method", "vqt", "--preset", "synqt:vtab/dtd"))
    with pytest.raises(ConfigError, match="--method or --preset"):
        _method_and_config(_args())
