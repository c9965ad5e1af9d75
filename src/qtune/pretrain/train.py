"""Supervised pre-training of a small timm ViT on FractalDB-style classes and Fashion-MNIST, by one resumable command.

The recipe follows Nakashima et al. 2022, "Can Vision Transformers Learn without Natural Images?" (AAAI), on data made
as in Kataoka et al. 2020, "Pre-training without Natural Images" (ACCV): classify rendered fractals by their IFS with
AdamW, linear warm-up then cosine decay and light geometric augmentation; Fashion-MNIST's classes join the label space
(`qtune.pretrain.data`). The output is a backbone (timm state-dict names, no classification head) in safetensors plus a
JSON model card next to it. The defaults of PretrainConfig are the demo backbone's recipe (its card says how long it
took):

    python -m qtune.pretrain.train --out demo_vit.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
import timm
from timm.models.vision_transformer import VisionTransformer
from timm.scheduler import CosineLRScheduler

from qtune.engine.predict import accuracies
from qtune.engine.state import load_state, save_state
from qtune.engine.steps import warmup_cosine
from qtune.io import append_jsonl, atomic_write, file_sha256, write_text
from qtune.pretrain import data as pretrain_data
from qtune.pretrain.fractal import FractalDataset

log = logging.getLogger("qtune.pretrain")

MEAN = STD = (0.5, 0.5, 0.5)
TRAIN_STREAM, EVAL_STREAM = 1, 2
CARD_VERSION = 1
TIMM_ARCHITECTURE = "vit_tiny_patch16_224"  # a registered name whose other defaults match timm_kwargs
_MODEL_ARG_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")


@dataclass
class PretrainConfig:
    """Everything that determines the pre-trained weights (threads and budgets only decide how fast we get there)."""

    # model: a timm VisionTransformer
    img_size: int = 32
    patch_size: int = 4
    embed_dim: int = 96  # 1.35 M parameters; 192 (5.4 M) is about 4x slower per image on a CPU
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    # another timm architecture instead, as JSON: {"architecture": name, ...its create_model arguments}; e.g. a small
    # Swin or ConvNeXt for 32 px images (examples/pretrain-hierarchical.sh). The ViT fields above are then unused,
    # except img_size, the size of the images rendered (give the model the same).
    timm_model: str | None = None
    # data: FractalDB-style classes, and Fashion-MNIST's training images (all, or the first fashion_images)
    data: str = "fractal+fashion_mnist"
    fashion_images: int | None = None
    num_classes: int = 100
    images_per_class: int = 400
    eval_images_per_class: int = 20
    # optimisation
    steps: int | None = 14000  # None: fit the number of steps to time_budget_minutes after measuring the speed
    # Small batches: at a budget of a few epochs, more updates per image learn faster (measured: at 19k images,
    # batch 32 without label smoothing was at 2.8% train accuracy where batch 128 with it was at 1.6%).
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    label_smoothing: float = 0.0  # a few epochs only: nothing to regularise against yet
    crop_scale: tuple[float, float] = (0.6, 1.0)
    grad_clip: float = 1.0
    seed: int = 0
    save_dtype: str = "float16"
    # how the run is executed (not part of the recipe)
    threads: int = 2
    time_budget_minutes: float | None = None
    checkpoint_minutes: float = 5.0
    log_every: int = 100

    def recipe(self) -> dict[str, Any]:
        """The fields that must match for a checkpoint to be resumed."""
        skip = {"threads", "time_budget_minutes", "checkpoint_minutes", "log_every", "steps"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def timm_kwargs(self, num_classes: int = 0) -> dict[str, Any]:
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": True,
            "class_token": True,
            "global_pool": "token",
            "num_classes": num_classes,
        }

    def architecture(self) -> tuple[str, dict[str, Any]]:
        """The timm architecture name and the arguments that build it (the model card's)."""
        if self.timm_model is None:
            return TIMM_ARCHITECTURE, {k: v for k, v in self.timm_kwargs().items() if k in _MODEL_ARG_KEYS}
        args = json.loads(self.timm_model)
        if not isinstance(args, dict) or not isinstance(args.get("architecture"), str):
            raise ValueError(f"--timm-model {self.timm_model!r}: give a JSON object with an \"architecture\" name")
        return args.pop("architecture"), args


def make_model(config: PretrainConfig) -> torch.nn.Module:
    num_labels = pretrain_data.num_labels(config.data, config.num_classes)
    if config.timm_model is None:
        return VisionTransformer(**config.timm_kwargs(num_labels))
    name, args = config.architecture()
    return timm.create_model(name, pretrained=False, num_classes=num_labels, **args)


def _paths(out_path: Path) -> dict[str, Path]:
    work = out_path.with_name(out_path.stem + ".work")
    # model.safetensors + config.json is timm's hub layout, which backbone loaders accept as a folder
    card = out_path.with_name("config.json") if out_path.name == "model.safetensors" else out_path.with_suffix(".json")
    return {
        "out": out_path,
        "card": card,
        "work": work,
        "ckpt": work / "checkpoint.safetensors",  # no pickle: a crafted one would run code when resumed
        "data": work / "train_images.npy",
        "log": work / "log.jsonl",
    }


def _schedule(opt: torch.optim.Optimizer, total: int, config: PretrainConfig) -> CosineLRScheduler:
    """The engine's warmup + cosine over ``total`` steps, the first ``warmup_fraction`` of them (at least one)
    warming up."""
    return warmup_cosine(opt, total, max(1, int(config.warmup_fraction * total)), config.min_lr)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, position embedding and class token (as in DeiT and timm)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _augment(images: torch.Tensor, generator: torch.Generator, crop_scale: tuple[float, float]) -> torch.Tensor:
    """Random resized crop (area share in crop_scale, aspect kept) and horizontal flip, per image, in one resample."""
    b = images.shape[0]
    side = torch.sqrt(torch.empty(b).uniform_(*crop_scale, generator=generator))
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (1 - side)[:, None]
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _batch_index(step: int, n: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the step's batch: a fresh permutation per epoch, fixed by (seed, epoch), so resuming is exact."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng(np.random.SeedSequence([seed, 3, epoch])).permutation(n)
    return perm[i * batch_size : (i + 1) * batch_size]


def _train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    schedule: CosineLRScheduler,
    data: FractalDataset,
    step: int,
    config: PretrainConfig,
) -> tuple[float, float]:
    """One optimisation step; the batch, the augmentation and the learning rate are functions of the step alone."""
    schedule.step_update(step)
    images, labels = data.batch(_batch_index(step, len(data), config.batch_size, config.seed))
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    logits = model(_normalise(_augment(images, gen, config.crop_scale)))
    loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    opt.step()
    return float(loss.detach()), accuracies(logits.detach()[None], labels)[0]


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: FractalDataset, batch_size: int = 256) -> float:
    """Top-1 accuracy on un-augmented images."""
    if not len(data):
        return 0.0
    model.eval()
    logits, labels = [], []
    for start in range(0, len(data), batch_size):
        images, y = data.batch(np.arange(start, min(start + batch_size, len(data))))
        logits.append(model(_normalise(images)))
        labels.append(y)
    model.train()
    return accuracies(torch.cat(logits)[None], torch.cat(labels))[0]  # (1, N, classes): a stack of one model


def measure_throughput(config: PretrainConfig, threads: int, batch_size: int = 128, steps: int = 5) -> float:
    """Training images per second (forward, backward, AdamW step) of config's model on random data."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = make_model(config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(batch_size, 3, config.img_size, config.img_size)
        y = torch.randint(0, config.num_classes, (batch_size,))
        elapsed = 0.0
        for i in range(steps + 1):  # the first step warms up allocators and kernels
            t = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            elapsed += (time.perf_counter() - t) if i else 0.0
        return batch_size * steps / elapsed
    finally:
        torch.set_num_threads(previous)


def _backbone_state(model: torch.nn.Module, dtype: str) -> dict[str, torch.Tensor]:
    """The weights without the classifier, under timm's names (ConvNeXt's head.norm is the pooled feature's norm and
    stays)."""
    cast = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    classifier = {id(p) for p in model.get_classifier().parameters()}
    names = {n for n, p in model.named_parameters() if id(p) in classifier}
    return {k: v.detach().to(cast).contiguous() for k, v in model.state_dict().items() if k not in names}


def pretrain(
    out_path: Path | str,
    config: PretrainConfig | None = None,
    *,
    stop_after_steps: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Pre-train (or resume) and write `out_path` (.safetensors, no head) and its model card (.json); return the card.

    Fields of PretrainConfig can be given as keyword overrides. Work files live in `<stem>.work/` next to out_path: the
    rendered training set and a checkpoint written every `checkpoint_minutes` and whenever the run stops early. Calling
    again with the same recipe resumes from the checkpoint; a different recipe raises ValueError. The call stops early,
    writes a checkpoint and returns {"complete": False, "step": ..., ...} after `stop_after_steps` steps in all or when
    `time_budget_minutes` of this call are spent; on KeyboardInterrupt it writes a checkpoint and re-raises.
    """
    config = dataclasses.replace(config or PretrainConfig(), **overrides)
    paths = _paths(Path(out_path))
    paths["work"].mkdir(parents=True, exist_ok=True)
    if paths["out"].is_file() and paths["card"].is_file():
        card = json.loads(paths["card"].read_text())
        steps_differ = config.steps is not None and card["training"]["steps"] != config.steps
        if card.get("recipe") != json.loads(json.dumps(config.recipe())) or steps_differ:
            raise ValueError(f"{paths['out']} was pre-trained with another recipe; delete it or choose another --out")
        log.info("%s already complete; nothing to do", paths["out"])
        return card
    torch.set_num_threads(config.threads)
    t_start = time.time()

    state = load_state(paths["ckpt"]) if paths["ckpt"].is_file() else None
    steps_differ = state is not None and config.steps is not None and state["total_steps"] != config.steps
    if state is not None and (state["recipe"] != config.recipe() or steps_differ):
        raise ValueError(f"checkpoint {paths['ckpt']} belongs to another recipe; delete {paths['work']} to restart")

    log.info("rendering %d fractal classes x %d images (data: %s)", config.num_classes, config.images_per_class,
             config.data)
    data = pretrain_data.build(config.data, config.num_classes, config.images_per_class, config.img_size, config.seed,
                               TRAIN_STREAM, cache=paths["data"], fashion_limit=config.fashion_images)
    torch.manual_seed(config.seed)
    model = make_model(config)
    opt = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.999))
    history: dict[str, Any] = {"wall_time_s": 0.0, "resumed_at": [], "render_s": time.time() - t_start}
    if state is not None:
        step, total = state["step"], state["total_steps"]
    else:
        step = 0
        total = config.steps if config.steps is not None else _fit_steps(config, t_start)
    # made before the optimiser's state is loaded, so that its base rate is config.lr; it has no state of its own
    # to resume: the rate is a function of the step
    schedule = _schedule(opt, total, config)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        history = state["history"]
        history["resumed_at"].append(step)
        log.info("resuming at step %d of %d", step, total)
    model.train()

    def checkpoint() -> None:
        history["wall_time_s"] += time.time() - segment_start
        state = {
            "recipe": config.recipe(),
            "step": step,
            "total_steps": total,
            "history": history,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
        }
        save_state(paths["ckpt"], state)
        append_jsonl(paths["log"], {"event": "checkpoint", "step": step})

    segment_start = last_ckpt = last_log = time.time()
    budget_s = None if config.time_budget_minutes is None else 60 * config.time_budget_minutes
    window: list[tuple[float, float]] = []
    try:
        while step < total:
            if stop_after_steps is not None and step >= stop_after_steps:
                break
            if budget_s is not None and time.time() - t_start > budget_s:
                log.warning("time budget spent at step %d of %d; run again to resume", step, total)
                break
            window.append(_train_step(model, opt, schedule, data, step, config))
            step += 1
            if step % config.log_every == 0 or step == total:
                now = time.time()
                loss, acc = np.mean(window, axis=0)
                record = {
                    "step": step,
                    "total": total,
                    "loss": float(loss),
                    "train_acc": float(acc),
                    "lr": opt.param_groups[0]["lr"],  # the last step's
                    "img_per_s": config.batch_size * len(window) / max(now - last_log, 1e-9),
                }
                append_jsonl(paths["log"], record)
                log.info(
                    "step %d/%d loss %.3f acc %.3f lr %.2e %.0f img/s",
                    step,
                    total,
                    loss,
                    acc,
                    record["lr"],
                    record["img_per_s"],
                )
                window, last_log = [], now
            if time.time() - last_ckpt > 60 * config.checkpoint_minutes and step < total:
                checkpoint()
                segment_start = last_ckpt = time.time()
    except KeyboardInterrupt:
        checkpoint()
        raise
    if step < total:
        checkpoint()
        return {"complete": False, "step": step, "total_steps": total, "checkpoint": str(paths["ckpt"])}

    history["wall_time_s"] += time.time() - segment_start
    return _finish(model, config, paths, step, history)


def _fit_steps(config: PretrainConfig, t_start: float) -> int:
    """Number of steps that fits the remaining time budget, from a short measurement of this machine's speed."""
    if config.time_budget_minutes is None:
        raise ValueError("give steps, or time_budget_minutes to fit the number of steps to it")
    rate = measure_throughput(config, config.threads, config.batch_size, steps=3)
    eval_reserve = 0.05 * 60 * config.time_budget_minutes  # final evaluation, export and slack
    left = 60 * config.time_budget_minutes - (time.time() - t_start) - eval_reserve
    steps = max(1, int(left * rate / config.batch_size))
    log.info("measured %.0f img/s: %d steps fit the %g-minute budget", rate, steps, config.time_budget_minutes)
    return steps


def _finish(
    model: torch.nn.Module, config: PretrainConfig, paths: dict[str, Path], step: int, history: dict[str, Any]
) -> dict[str, Any]:
    t_eval = time.time()
    held_out = FractalDataset.build(
        config.num_classes, config.eval_images_per_class, config.img_size, config.seed, EVAL_STREAM
    )
    top1 = round(evaluate(model, held_out), 6)  # a float32 mean: six places are all it holds
    log.info("held-out top-1 on %d fresh renders: %.4f", len(held_out), top1)
    evals = {"held_out_top1": top1, "num_images": len(held_out)}
    if config.data == "fractal+fashion_mnist":  # its own test split, with the fractal classes' outputs allowed
        fashion = pretrain_data.fashion_set(config.img_size, "test", offset=config.num_classes)
        evals["fashion_mnist_test_top1"] = round(evaluate(model, fashion), 6)
        evals["fashion_mnist_test_images"] = len(fashion)
        log.info("Fashion-MNIST test top-1: %.4f", evals["fashion_mnist_test_top1"])

    tensors = _backbone_state(model, config.save_dtype)
    architecture, model_args = config.architecture()
    timm_kwargs = config.timm_kwargs() if config.timm_model is None else {**model_args, "num_classes": 0}
    def save(path: Path) -> None:
        save_file(tensors, str(path), metadata={"format": "pt", "timm_kwargs": json.dumps(timm_kwargs)})
        os.chmod(path, 0o644)  # a shipped file, readable by all (temporary files are private)

    atomic_write(paths["out"], save)
    n_params = sum(t.numel() for t in tensors.values())
    n_train = config.num_classes * config.images_per_class + (
        (config.fashion_images or 60_000) if config.data == "fractal+fashion_mnist" else 0)
    card = {
        "card_version": CARD_VERSION,
        "complete": True,
        "architecture": architecture,  # timm.create_model(architecture, **model_args) builds the same network
        "model_args": model_args,
        "num_classes": 0,
        "timm_class": f"{type(model).__module__}.{type(model).__name__}",
        "timm_kwargs": timm_kwargs,
        "pretrained_cfg": {
            "input_size": [3, config.img_size, config.img_size],
            "mean": list(MEAN),
            "std": list(STD),
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "num_classes": 0,
        },
        "weights": {
            "file": paths["out"].name,
            "sha256": file_sha256(paths["out"]),
            "bytes": paths["out"].stat().st_size,
            "dtype": config.save_dtype,
            "num_params": n_params,
            "head": "removed",
        },
        "data": {
            "kind": {"fractal": "FractalDB-style IFS classes (no natural images)",
                     "fractal+fashion_mnist": "FractalDB-style IFS classes and Fashion-MNIST's training images "
                     "(MIT; Debian's dataset-fashion-mnist), grey"}[config.data],
            "source": config.data,
            "fashion_mnist_images": (config.fashion_images or 60_000) if config.data != "fractal" else 0,
            "num_classes": config.num_classes,
            "images_per_class": config.images_per_class,
            "image_size": config.img_size,
            "seed": config.seed,
            "ifs_maps": "2-4",
            "held_out_images_per_class": config.eval_images_per_class,
        },
        "training": {
            "steps": step,
            "epochs": round(step * config.batch_size / n_train, 2),
            "batch_size": config.batch_size,
            "optimizer": "AdamW",
            "lr": config.lr,
            "min_lr": config.min_lr,
            "weight_decay": config.weight_decay,
            "warmup_fraction": config.warmup_fraction,
            "schedule": "linear warm-up, cosine",
            "label_smoothing": config.label_smoothing,
            "augmentation": f"random resized crop (area {list(config.crop_scale)}), horizontal flip",
            "threads": config.threads,
            "wall_time_s": round(history["wall_time_s"], 1),
            "img_per_s": round(step * config.batch_size / max(history["wall_time_s"], 1e-9), 1),
            "render_s": round(history.get("render_s", 0.0), 1),
            "resumed_at": history["resumed_at"],
        },
        "eval": {**evals, "eval_s": round(time.time() - t_eval, 1)},
        "recipe": config.recipe(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": __import__("timm").__version__,
            "numpy": np.__version__,
        },
        "references": [
            "Kataoka et al. 2020, Pre-training without Natural Images (ACCV)",
            "Nakashima et al. 2022, Can Vision Transformers Learn without Natural Images? (AAAI)",
            "Anderson & Farrell 2022, Improving Fractal Pre-training (WACV)",
            "Xiao, Rasul & Vollgraf 2017, Fashion-MNIST (arXiv:1708.07747)",
        ],
    }
    write_text(paths["card"], json.dumps(card, indent=2) + "\n")
    append_jsonl(paths["log"], {"event": "done", "step": step, "held_out_top1": top1})
    for name in ("ckpt", "data"):  # large and reproducible; the log stays
        paths[name].unlink(missing_ok=True)
    paths["data"].with_suffix(".json").unlink(missing_ok=True)
    return card


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qtune.pretrain.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output .safetensors (the model card goes next to it)")
    p.add_argument("--benchmark", action="store_true", help="only print training images/s at 1 and 2 threads")
    p.add_argument("--stop-after-steps", type=int, default=None, help="end this call after this many steps in all")
    for f in dataclasses.fields(PretrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if f.name == "crop_scale":
            p.add_argument(flag, type=float, nargs=2, default=default)
        elif f.name == "steps":
            p.add_argument(flag, type=_steps_arg, default=default, help="an integer, or 'auto' to fit the time budget")
        elif f.name == "time_budget_minutes":
            p.add_argument(flag, type=float, default=default)
        elif f.name == "fashion_images":
            p.add_argument(flag, type=int, default=default, help="the first N of Fashion-MNIST's images (default all)")
        elif f.name == "timm_model":
            p.add_argument(flag, default=default, help="another timm architecture as JSON: "
                           '{"architecture": NAME, ...create_model arguments}')
        elif f.name == "data":
            p.add_argument(flag, choices=pretrain_data.SOURCES, default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    return p


def _steps_arg(value: str) -> int | None:
    return None if value == "auto" else int(value)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)}
    fields["crop_scale"] = tuple(fields["crop_scale"])
    config = PretrainConfig(**fields)
    if args.benchmark:
        for threads in (1, 2):
            print(f"{threads} thread(s): {measure_throughput(config, threads, config.batch_size):.1f} img/s")
        return
    card = pretrain(args.out, config, stop_after_steps=args.stop_after_steps)
    print(
        json.dumps(
            {k: card[k] for k in ("complete", "eval", "weights") if k in card} if card.get("complete") else card,
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
