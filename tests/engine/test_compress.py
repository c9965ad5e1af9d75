"""VQT's and Head2Toe's feature selection: a head over the kept dimensions, chosen by an L2,1-penalised classifier."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qtune.cli import main
from qtune.engine.checkpoint import load_adapter, save_adapter
from qtune.engine.compress import classifier_inputs, compress, train_classifier
from qtune.engine.config import TrainConfig
from qtune.engine.predict import predict
from qtune.errors import ConfigError
from qtune.tuned import TunedModel
from tests.engine.test_many import CLASSES, TapBatches

CFG = TrainConfig(epochs=3, batch_size=16, warmup_epochs=1, lr=1e-2, progress=False)


def test_a_head_over_kept_dimensions_reads_exactly_those(backbone):
    full = TunedModel.build(backbone, "vqt", CLASSES, {"tokens": 1}, seed=0)
    ids = [0, 5, 47, 60, 100]
    small = TunedModel.build(backbone, "vqt", CLASSES, {"tokens": 1, "feature_ids": ids}, seed=0)
    with torch.no_grad():
        small.method.queries.copy_(full.method.queries)
    batches = TapBatches(backbone, full.blocks_read())
    feats, _ = classifier_inputs(full, batches, CFG)
    [logits], _ = predict([small], batches, CFG)
    head = small.method.head
    assert head.in_features == len(ids)
    assert torch.allclose(logits, feats[:, ids] @ head.weight.T + head.bias, atol=1e-5)
    with pytest.raises(ConfigError, match="beyond"):
        TunedModel.build(backbone, "vqt", CLASSES, {"tokens": 1, "feature_ids": [10**6]})


def test_compression_keeps_a_fraction_and_round_trips(backbone, tmp_path):
    model = TunedModel.build(backbone, "vqt", CLASSES, {"tokens": 2}, seed=0)
    batches = TapBatches(backbone, model.blocks_read())
    small, info = compress(model, batches, keep=0.5, cfg=CFG)
    width = (1 + backbone.depth * 2) * backbone.dim
    assert info["features_before"] == width and info["features_after"] == width // 2
    assert small.method.head.weight.shape == (CLASSES, width // 2)
    assert info["head_parameters_after"] < info["head_parameters_before"]
    assert torch.equal(small.method.queries, model.method.queries)  # the queries are kept as trained
    save_adapter(tmp_path / "ckpt", small, [str(c) for c in range(CLASSES)])
    again, cfg = load_adapter(tmp_path / "ckpt", backbone)
    assert cfg["method_config"]["feature_ids"] == small.method.config.feature_ids
    assert torch.allclose(predict([again], batches, CFG)[0][0], predict([small], batches, CFG)[0][0], atol=1e-6)
    # compressing the compressed model chooses among its dimensions, named in the original numbering
    smaller, info2 = compress(small, batches, keep=0.5, cfg=CFG)
    assert info2["features_before"] == width // 2 and info2["features_after"] == width // 4
    assert set(smaller.method.config.feature_ids) <= set(small.method.config.feature_ids)


def test_head2toe_selects_among_its_features_and_keeps_nothing_else_to_train(backbone):
    model = TunedModel.build(backbone, "head2toe", CLASSES, {"target_size": 96}, seed=0)
    batches = TapBatches(backbone, (), model.points_read())
    small, info = compress(model, batches, keep=0.25, cfg=CFG)
    width = model.method.head.in_features
    assert info["features_after"] == width // 4 and small.method.head.in_features == width // 4
    feats, _ = classifier_inputs(model, batches, CFG)
    head = small.method.head
    expected = feats[:, small.method.config.feature_ids] @ head.weight.T + head.bias
    assert torch.allclose(predict([small], batches, CFG)[0][0], expected, atol=1e-5)


def test_the_penalty_concentrates_the_weight_on_few_dimensions():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 64, generator=g)
    labels = (feats[:, :4].sum(1) > 0).long()  # only the first 4 dimensions carry the label
    cfg = TrainConfig(epochs=30, batch_size=50, warmup_epochs=1, lr=3e-2, progress=False)
    norms = {}
    for penalty in (0.0, 0.05):
        torch.manual_seed(0)
        head = torch.nn.Linear(64, 2)
        train_classifier(head, feats, labels, cfg, penalty)
        norms[penalty] = head.weight.detach().norm(dim=0)
    share = {p: (n[:4].sum() / n.sum()).item() for p, n in norms.items()}
    assert share[0.05] > 2 * share[0.0]
    assert set(norms[0.05].topk(4).indices.tolist()) == {0, 1, 2, 3}


def test_cli_compress_writes_a_smaller_checkpoint_and_refuses_other_methods(shapes, tmp_path, capsys):
    from tests.test_cli import _train

    assert main(_train(shapes, tmp_path / "vqt", method="vqt")) == 0
    ckpt = str(tmp_path / "vqt" / "run" / "checkpoint")
    out = tmp_path / "small"
    argv = ["compress", "--checkpoint", ckpt, "--data", str(shapes / "train"), "--test", str(shapes / "test"),
            "--keep", "0.25", "--epochs", "2", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["features_after"] == result["features_before"] // 4
    assert 0.0 <= result["test_accuracy_after"] <= 1.0
    assert "head input" in capsys.readouterr().out
    assert main(argv) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--keep", "0", "--overwrite"]) == 2 and "--keep must be in" in capsys.readouterr().err
    assert main(_train(shapes, tmp_path / "lin", method="linear")) == 0
    lin = ["compress", "--checkpoint", str(Path(tmp_path / "lin" / "run" / "checkpoint")), "--data",
           str(shapes / "train"), "--out", str(tmp_path / "x")]
    assert main(lin) == 2 and "feature selection is VQT's" in capsys.readouterr().err
