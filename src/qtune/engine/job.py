"""A complete training run: backbone + data + method + schedule -> a run folder with config, metrics, result
and an adapter checkpoint: what `qtune train` runs."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..backbones import BackboneSpec
from ..cache.use import batches_for
from ..data import Listing, read_split
from ..data.batches import ImageBatches
from ..errors import CheckpointError, ConfigError, TrainingError
from ..io import append_jsonl, exclusive_folder, write_csv, write_json, write_text
from ..methods import get_method
from ..tuned import TunedModel
from .checkpoint import save_adapter
from .config import TrainConfig
from .loop import fit, peak_memory
from .predict import evaluate
from .provenance import provenance


@dataclass
class DataSpec:
    train: str
    val: str | None = None
    test: str | None = None
    num_classes: int | None = None
    root: str | None = None

    def read(self) -> dict[str, Listing]:
        """Listings of the given splits, sharing the training split's classes."""
        root = Path(self.root) if self.root else None
        train = read_split(self.train, num_classes=self.num_classes, root=root)
        splits = {"train": train}
        for name in ("val", "test"):
            path = getattr(self, name)
            if path:
                splits[name] = read_split(path, classes=train.classes, num_classes=len(train.classes), root=root)
        return splits


@dataclass
class JobSpec:
    backbone: BackboneSpec
    data: DataSpec
    method: str
    method_config: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    out_dir: str = "runs/run"
    cache: str | None = None  # a TapCache folder: splits it matches are read from it instead of traced live
    stream_blocks: bool = False  # with a cache: read one block's K/V at a time, checkpointed (flat memory in depth)
    recipe: str | None = None  # where ``train`` started from (a method's own recipe, a preset), as recorded
    cache_fallback: bool = False  # a corrupt cache: trace live with a note instead of stopping

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, path: Path, train_overrides: dict[str, Any] | None = None,
                    out_dir: str | None = None) -> "JobSpec":
        """The spec a run recorded in its config.json, to run it again (optionally elsewhere, or with other
        training settings)."""
        try:
            d = json.loads(Path(path).read_text())
            return cls(BackboneSpec(**d["backbone"]), DataSpec(**d["data"]), d["method"], d.get("method_config", {}),
                       TrainConfig(**{**d["train"], **(train_overrides or {})}), out_dir or d["out_dir"],
                       cache=d.get("cache"), stream_blocks=d.get("stream_blocks", False), recipe=d.get("recipe"),
                       cache_fallback=d.get("cache_fallback", False))
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a qtune run's config.json ({type(e).__name__}: {e})") from None


STATE = "train_state.safetensors"  # in the partial folder only: what a resumed run continues from
PICKLED_STATE = "train_state.pt"  # what older versions wrote there: never unpickled (a crafted one runs code)


def partial_dir(out: Path) -> Path:
    """Where a run is written until it finishes: a hidden sibling of its folder."""
    return out.with_name(f".{out.name}.partial")


def _check_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'qtune[tensorboard]'")


def train_job(spec: JobSpec, overwrite: bool = False, resume: bool = False,
              tensorboard: bool = False) -> dict[str, Any]:
    """Run one training job end to end; the test split, if any, is evaluated once, after training.

    The run is written to a hidden sibling folder and swapped in at the end, so an interrupted or failed run leaves
    the previous one (or nothing) in place. ``resume`` continues an interrupted run with the same settings from its
    last finished epoch, to the same final weights.
    """
    out = Path(spec.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out names a file; give a folder for the run")
    with exclusive_folder(out):  # one process per run folder: two would write one partial folder
        return _train_job(spec, out, overwrite, resume, tensorboard)


def _train_job(spec: JobSpec, out: Path, overwrite: bool, resume: bool, tensorboard: bool) -> dict[str, Any]:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: a run (or other files) is already there (pass --overwrite to replace it)")
    work = partial_dir(out)
    if resume and (work / PICKLED_STATE).is_file():
        raise CheckpointError(f"{work / PICKLED_STATE}: a pickled training state (older qtune), not loaded since "
                              "unpickling can run code; run without --resume to start again")
    if resume and not (work / STATE).is_file():
        raise ConfigError(f"{out}: no interrupted run to resume (nothing in {work})")
    if tensorboard:
        _check_tensorboard()
    spec.train.resolved_device()  # no GPU where one is asked for: say so before any loading
    get_method(spec.method)  # fail on an unknown method before any loading
    if spec.stream_blocks and not spec.cache:
        raise ConfigError("--stream-blocks reads K/V from a cache: pass --cache DIR too")
    splits = spec.data.read()
    backbone = spec.backbone.load()
    model = TunedModel.build(backbone, spec.method, len(splits["train"].classes), spec.method_config,
                             seed=spec.train.seed, own_backbone=True)
    method = model.method
    datasets, notes = batches_for(model, spec.cache, splits, stream=spec.stream_blocks, fallback=spec.cache_fallback,
                                  num_workers=spec.train.num_workers)
    for note in notes:
        print(note)
    cache_used = {k: not isinstance(b, ImageBatches) for k, b in datasets.items()} if spec.cache else {}
    if model.reads_taps and not model.live_only and not spec.cache and spec.train.epochs > 1:
        print(f"qtune: {spec.method} reads only the frozen stream, traced here once per epoch ({spec.train.epochs} "
              f"passes); `qtune cache build --method {spec.method} ...` then --cache DIR trains from one pass")
    device = spec.train.resolved_device()
    config = {**spec.to_dict(), "method_config": method.config.to_dict(),
              "backbone_identity": backbone.identity.to_dict(), "preprocessing": backbone.preprocessing.to_dict(),
              "classes": list(splits["train"].classes)}
    if resume:
        before = json.loads((work / "config.json").read_text())
        changed = sorted(k for k in config if json.dumps(config[k], default=str) != json.dumps(before.get(k)))
        if changed:
            raise ConfigError(f"{out}: the interrupted run had other settings ({', '.join(changed)}); "
                              f"run without --resume to start again")
    else:
        if (work / STATE).is_file() or (work / PICKLED_STATE).is_file():
            print(f"qtune: discarding the interrupted run in {work} (--resume would continue it)", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)  # an interrupted run that is not resumed starts again
        work.mkdir(parents=True)
        write_json(work / "config.json", config)
    try:
        result = _train_into(work, spec, model, splits, datasets, device, cache_used, tensorboard)
    except TrainingError:
        shutil.rmtree(work, ignore_errors=True)  # a diverged run cannot be resumed to anything better
        raise
    (work / STATE).unlink()
    _swap_in(work, out)
    return result


def _swap_in(work: Path, out: Path) -> None:
    """Replace ``out`` by ``work`` with renames (the old run is moved aside first, then deleted)."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.rename(out, old)
    os.rename(work, out)
    shutil.rmtree(old, ignore_errors=True)


def _train_into(out: Path, spec: JobSpec, model: TunedModel, splits: dict, datasets: dict, device: torch.device,
                cache_used: dict[str, bool], tensorboard: bool = False) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    board = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(out / "tensorboard"))

    def on_epoch(record: dict[str, Any]) -> None:
        append_jsonl(out / "metrics.jsonl", record)
        for key, value in record.items():
            if board is not None and key != "epoch":
                board.add_scalar(key, value, record["epoch"])

    start = time.perf_counter()
    history = fit(model, datasets["train"], spec.train, datasets.get("val"), on_epoch=on_epoch, state=out / STATE)
    if board is not None:
        board.close()
    train_seconds = time.perf_counter() - start
    # the history is the record, also across a resume (which may have repeated a line of the interrupted epoch)
    write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    result: dict[str, Any] = {
        "method": spec.method,
        "trainable_parameters": model.num_trainable(),
        "train_seconds": train_seconds,
        "final_train_loss": history[-1]["train_loss"],
        **peak_memory(device),
    }
    if spec.cache:
        result["cache_used"] = cache_used
    if "val" in datasets:
        result["val_accuracy"] = evaluate(model, datasets["val"], spec.train, "val")["accuracy"]
    if "test" in datasets:
        result["test_accuracy"] = evaluate(model, datasets["test"], spec.train, "test")["accuracy"]
    weights = str(Path(spec.backbone.weights).resolve()) if spec.backbone.weights else None
    save_adapter(out / "checkpoint", model, splits["train"].classes, extra={"backbone_weights": weights})
    result["provenance"] = provenance(device)
    write_csv(out / "metrics.csv", history)
    write_json(out / "result.json", result)
    return result
