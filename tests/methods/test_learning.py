"""Every registered method learns the generated 4-class task well above chance (0.25) on a tiny random ViT.

linear, vqt and synqt are covered by tests/engine/test_job.py. Settings per method are the smallest that learn
reliably here: prompt methods and VQT heads want the larger rates of their papers' grids, and SynQT uses the
paper's residual scales s' = s'' = 0.1 (with f = 0.1), which suit a random backbone better than the defaults.
"""
import pytest

from qtune.engine.job import BackboneSpec, DataSpec, JobSpec, train_job
from qtune.engine.config import TrainConfig
from qtune.methods import method_names
from tests.conftest import TINY, TINY_NAME

COVERED = ("linear", "vqt", "synqt")
SYNQT_SMALL_SCALES = {"synqt.attn_scale": 0.1, "synqt.ffn_scale": 0.1, "synqt.feat_scale": 0.1}
SETTINGS = {  # method: (epochs, lr, options)
    "vpt_shallow": (10, 0.05, {}),
    "vpt_deep": (10, 0.05, {}),
    "gatevpt": (10, 0.05, {}),
    "vpt_deep+vqt": (15, 0.05, {}),
    "adaptformer+vqt": (10, 0.05, {}),
    "vpt_deep+synqt": (15, 3e-3, SYNQT_SMALL_SCALES),
    "adaptformer+synqt": (15, 3e-3, SYNQT_SMALL_SCALES),
}


@pytest.mark.parametrize("method", [m for m in method_names() if m not in COVERED])
def test_method_learns_the_generated_task(shapes, tmp_path, method):
    epochs, lr, options = SETTINGS.get(method, (10, 3e-3, {}))
    cfg = TrainConfig(epochs=epochs, batch_size=32, lr=lr, warmup_epochs=1, progress=False)
    spec = JobSpec(BackboneSpec(TINY_NAME, model_args=TINY, random_init=True),
                   DataSpec(str(shapes / "train"), str(shapes / "val"), str(shapes / "test")),
                   method, options, cfg, str(tmp_path / "run"))
    result = train_job(spec)
    assert result["test_accuracy"] >= 0.5, result
