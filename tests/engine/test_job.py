"""End-to-end runs on generated data: learning, run folders, checkpoints."""
import json

import pytest
import torch

from qtune.backbones import load_backbone
from qtune.data import ImageDataset, read_split
from qtune.engine.checkpoint import TENSORS, load_adapter
from qtune.engine.job import BackboneSpec, DataSpec, JobSpec, train_job
from qtune.data.batches import ImageBatches
from qtune.engine.config import TrainConfig
from qtune.engine.predict import predict
from qtune.engine.steps import epoch_order
from qtune.errors import CheckpointError
from tests.conftest import TINY, TINY_NAME


def _spec(shapes, method, out, epochs=15, **train):
    train = {"lr": 3e-3, "warmup_epochs": 1, **train}
    cfg = TrainConfig(epochs=epochs, batch_size=32, progress=False, **train)
    return JobSpec(BackboneSpec(TINY_NAME, model_args=TINY, random_init=True),
                   DataSpec(str(shapes / "train"), str(shapes / "val"), str(shapes / "test")), method, {}, cfg, str(out))


@pytest.mark.parametrize("method", ["linear", "vqt", "synqt"])
def test_methods_learn_the_generated_task(shapes, tmp_path, method):
    # VQT's head reads L2-normalised features, so it wants the larger rates of the VQT paper's grid.
    result = train_job(_spec(shapes, method, tmp_path / method, lr=0.05 if method == "vqt" else 3e-3))
    assert result["test_accuracy"] >= 0.5, result  # 4 classes: chance is 0.25
    run = tmp_path / method
    assert json.loads((run / "config.json").read_text())["method"] == method
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 15 and json.loads(lines[-1])["epoch"] == 15
    for key in ("trainable_parameters", "train_seconds", "peak_memory_bytes", "provenance"):
        assert key in result


def test_checkpoint_round_trip_and_identity_check(shapes, tmp_path):
    train_job(_spec(shapes, "synqt", tmp_path / "run", epochs=2))
    backbone = load_backbone(TINY_NAME, model_args=TINY)
    model, cfg = load_adapter(tmp_path / "run" / "checkpoint", backbone)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "checkpoint" / TENSORS))
    assert all(k.startswith("method.") for k in saved)  # no frozen backbone weight in the file
    assert set(saved) == set(model.trainable_parameters())

    listing = read_split(shapes / "test", classes=cfg["classes"])
    batches = ImageBatches(ImageDataset(listing, backbone.preprocessing.transform()))
    run = TrainConfig(batch_size=16, progress=False)
    [first], _ = predict([model], batches, run)
    [again], _ = predict([load_adapter(tmp_path / "run" / "checkpoint", load_backbone(TINY_NAME, model_args=TINY))[0]],
                         batches, run)
    torch.testing.assert_close(first, again, rtol=0, atol=0)

    other = load_backbone(TINY_NAME, model_args=TINY, init_seed=3)
    with pytest.raises(CheckpointError) as e:  # both backbones named: where the weights came from, their hashes
        load_adapter(tmp_path / "run" / "checkpoint", other, "other.pth")
    assert (f"trained on another backbone: {TINY_NAME} (no weights file: random or hub weights, weights hash "
            f"{backbone.identity.weights_hash[:12]}), given {TINY_NAME} (other.pth, weights hash "
            f"{other.identity.weights_hash[:12]})") in str(e.value)


def test_schedule_warms_up_from_zero_and_ends_at_min_lr(shapes, tmp_path):
    train_job(_spec(shapes, "linear", tmp_path / "run", epochs=4, min_lr=1e-5, warmup_epochs=2))
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(3e-3 / 2, rel=0.05)  # half-way through warmup after epoch 1
    assert lrs[-1] == pytest.approx(1e-5, rel=1e-3)


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert epoch_order(50, 1, 3) == epoch_order(50, 1, 3)
    assert epoch_order(50, 1, 3) != epoch_order(50, 1, 4)
    assert sorted(epoch_order(50, 1, 3)) == list(range(50))


def test_finished_run_is_not_overwritten(shapes, tmp_path):
    from qtune.errors import ConfigError

    train_job(_spec(shapes, "linear", tmp_path / "run", epochs=1))
    with pytest.raises(ConfigError, match="already there"):
        train_job(_spec(shapes, "linear", tmp_path / "run", epochs=1))
