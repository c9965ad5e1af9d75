"""`qtune <command>`: a thin layer over the library. Input errors print one line and exit 2."""
from __future__ import annotations

import argparse
import ast
import csv
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError, QtuneError


def _kv_pairs(pairs: Sequence[str], what: str) -> dict[str, Any]:
    """``key=value`` strings to a dict, values parsed as Python literals where possible (ints, floats, bools)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what}: expected key=value, got {pair!r}")
        try:
            out[key.replace("-", "_")] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.replace("-", "_")] = raw
    return out


def _add_backbone_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", required=required, help="timm model name, e.g. vit_base_patch16_224")
    g.add_argument("--weights", help="local weights: .safetensors/.pth/.bin/.npz, or a folder in timm's hub layout")
    g.add_argument("--pretrained", action="store_true", help="fetch the hub weights of --backbone (needs a network)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="timm constructor argument (img_size=32, depth=4, global_pool=avg, ...)")
    g.add_argument("--input-size", type=int, help="override the preprocessing input size (square)")
    g.add_argument("--interpolation", choices=("bicubic", "bilinear", "nearest"))
    g.add_argument("--mean", type=float, nargs=3)
    g.add_argument("--std", type=float, nargs=3)


def _backbone_spec(args: argparse.Namespace):
    from .engine.job import BackboneSpec

    prep = {"input_size": args.input_size, "interpolation": args.interpolation, "mean": args.mean, "std": args.std}
    return BackboneSpec(args.backbone, args.weights, args.pretrained, _kv_pairs(args.model_arg, "--model-arg"),
                        {k: v for k, v in prep.items() if v is not None})


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .engine.loop import TrainConfig

    g = p.add_argument_group("training")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), f.type)
            g.add_argument(flag, type=kind, default=f.default, help=f"{f.metadata['help']} (default {f.default})")


def cmd_train(args: argparse.Namespace) -> None:
    from .engine.job import DataSpec, JobSpec, train_job
    from .engine.loop import TrainConfig

    train_cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    spec = JobSpec(_backbone_spec(args), DataSpec(args.train, args.val, args.test, args.num_classes, args.data_root),
                   args.method, _kv_pairs(args.method_opt, "--method-opt"), train_cfg, args.out)
    result = train_job(spec, overwrite=args.overwrite)
    acc = " ".join(f"{k}={result[k]:.4f}" for k in ("val_accuracy", "test_accuracy") if k in result)
    print(f"{args.method}: {result['trainable_parameters']:,} trainable parameters, "
          f"{result['train_seconds']:.1f} s, {acc or 'no evaluation split'}; run written to {args.out}")


def _load_checkpoint(args: argparse.Namespace):
    from .backbones import load_backbone
    from .engine.checkpoint import load_adapter, read_adapter_config

    cfg = read_adapter_config(Path(args.checkpoint))
    bb = cfg["backbone"]
    backbone = load_backbone(bb["name"], args.weights or cfg.get("backbone_weights"), model_args=bb["model_args"],
                             preprocessing=cfg.get("preprocessing"))
    return load_adapter(Path(args.checkpoint), backbone)


def cmd_eval(args: argparse.Namespace) -> None:
    from .data import ImageDataset, read_split
    from .engine.loop import ImageBatches, TrainConfig, evaluate

    model, cfg = _load_checkpoint(args)
    listing = read_split(args.data, classes=cfg["classes"], num_classes=cfg["num_classes"])
    run = TrainConfig(batch_size=args.batch_size, device=args.device, precision=args.precision,
                      progress=not args.quiet)
    metrics = evaluate(model, ImageBatches(ImageDataset(listing, model.backbone.preprocessing.transform())), run)
    print(f"accuracy {metrics['accuracy']:.4f} on {metrics['n']} images ({args.data})")


def cmd_predict(args: argparse.Namespace) -> None:
    from .data import IMAGE_SUFFIXES, ImageDataset, Listing
    from .engine.loop import ImageBatches, TrainConfig, predict
    from .io import atomic_write

    model, cfg = _load_checkpoint(args)
    folder = Path(args.images)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: image folder not found")
    files = sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*")
                   if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"{folder}: no images found")
    listing = Listing(folder, tuple((f, 0) for f in files), tuple(cfg["classes"]), folder)
    run = TrainConfig(batch_size=args.batch_size, device=args.device, precision=args.precision,
                      progress=not args.quiet)
    logits, _ = predict(model, ImageBatches(ImageDataset(listing, model.backbone.preprocessing.transform())), run)
    probs = logits.softmax(1)

    def write(path: Path) -> None:
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "class", "probability"])
            for rel, p in zip(files, probs):
                k = int(p.argmax())
                w.writerow([rel, k, cfg["classes"][k], f"{p[k].item():.6f}"])

    atomic_write(Path(args.out), write)
    print(f"{len(files)} predictions written to {args.out}")


def cmd_methods(args: argparse.Namespace) -> None:
    import torch

    from .methods import create_method, get_method, method_names
    from .tuned import TunedModel

    backbone = _backbone_spec(args).load()
    print(f"{backbone.identity.name}: depth {backbone.depth}, width {backbone.dim}, {args.num_classes} classes")
    print(f"{'method':<10} {'kind':<7} {'trainable':>12}  summary")
    for name in method_names():
        cls = get_method(name)
        with torch.random.fork_rng(devices=[]):
            model = TunedModel(backbone, create_method(name, backbone, args.num_classes))
        n = model.num_trainable()
        backbone.requires_grad_(False)  # stream methods unfreeze the shared backbone
        kind = "side" if cls.reads_taps else "stream"
        print(f"{name:<10} {kind:<7} {n:>12,}  {cls.summary}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), quick=args.quick, progress=not args.quiet)


def cmd_data_check(args: argparse.Namespace) -> None:
    from .data.check import check_dataset

    print("\n".join(check_dataset(args.path).lines()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a method on a dataset and write a run folder")
    _add_backbone_args(p)
    p.add_argument("--method", required=True, help="method name (see `qtune methods`)")
    p.add_argument("-O", "--method-opt", action="append", default=[], metavar="KEY=VALUE", help="method option")
    p.add_argument("--train", required=True, help="training split: image folder or list file")
    p.add_argument("--val", help="validation split (monitoring; never used to select on test)")
    p.add_argument("--test", help="test split, evaluated once after training")
    p.add_argument("--data-root", help="root for list-file paths (default: the list file's folder)")
    p.add_argument("--num-classes", type=int, help="number of classes (default: from the data)")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    for name, func, helptext in (("eval", cmd_eval, "accuracy of a checkpoint on a labelled split"),
                                 ("predict", cmd_predict, "predictions of a checkpoint for a folder of images")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--checkpoint", required=True, help="checkpoint folder (a run's checkpoint/)")
        p.add_argument("--weights", help="backbone weights, if the checkpoint's backbone was loaded from a file")
        if name == "eval":
            p.add_argument("--data", required=True, help="image folder or list file")
        else:
            p.add_argument("--images", required=True, help="folder of images")
            p.add_argument("--out", required=True, help="CSV file to write")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--device", default="auto")
        p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
        p.add_argument("--quiet", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("methods", help="list the methods with their trainable parameter counts on a backbone")
    _add_backbone_args(p)
    p.add_argument("--num-classes", type=int, default=100)
    p.set_defaults(func=cmd_methods)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="verify a dataset (VTAB-1k task folder, FGVC annotations, folder or list)")
    p.add_argument("path")
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("demo", help="the offline example: train methods on generated data and print a table")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        args.progress = False
    try:
        args.func(args)
    except QtuneError as e:
        print(f"qtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qtune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
