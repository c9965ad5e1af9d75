"""int8 K/V caches against fp32 and fp16 caches of the same images, on a pretrained ViT: size per image, quantisation
error per block, training speed, logits and test accuracy of linear, VQT, SynQT and DTL+.

Per task, the training images (train800val200) and the test images (in shards of --shard) are traced once into an
fp32 cache; the fp16 and int8 caches of the same images are written by ``build_cache`` from the fp32 cache's values
(``Replay``: the numbers a second trace would compute, without its cost). The methods reading K/V (and the linear
probe) and those reading block points (DTL+) get caches of their own, and every cache is deleted once used, so disk
use stays near one split's fp32 and fp16 caches. Every method trains once per dtype from the training cache of that
dtype, with the same seed and batch order, and is tested once on the test caches of that dtype. Logit
differences are taken against the fp32-trained model on the fp32 cache, two ways:
  same weights: the fp32-trained model reading its test K/V from the other cache (what storage alone changes);
  trained on it: the model trained and tested on the other cache (end to end).
The int8 layout not stored (one scale per token) is measured in memory on the fp32 test cache, as are block points
quantised to int8 (int8 caches keep the pooled feature and block points in fp16: DTL+ reads only points, and the
linear probe only the pooled feature, so both read the same bytes from an int8 cache as from an fp16 one; checked).

One torch thread; times are CPU seconds of the process per epoch (wall seconds in the JSON). Schedules are each
method's recipe (optimizer, lr, batch, decay) cut to a few epochs (EPOCHS, or --epochs), with warmup a fifth of
them: the dtypes are compared under one schedule, not the methods at their best.

    python benchmarks/cache_int8.py --weights ../shared/weights/vit_tiny_patch16_224.augreg_in21k_ft_in1k \\
        --flowers ../data/vtab-1k/oxford_flowers102 --out runs/cache-int8 --json benchmarks/results/cache_int8.json
"""
from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from qtune.backbones import Backbone, Taps, load_backbone
from qtune.cache import CachedBatches, TapCache, build_cache
from qtune.cache.manifest import POOLED, bytes_per_row, kv_files, point_file
from qtune.cache.quant import SCALE_LAYOUTS, roundtrip
from qtune.data import Listing, read_split
from qtune.data.offline import make_offline_benchmark
from qtune.engine.config import TrainConfig
from qtune.engine.loop import fit
from qtune.engine.predict import predict
from qtune.engine.provenance import provenance
from qtune.io import write_json
from qtune.methods.presets import method_recipe
from qtune.tuned import TunedModel

CPU = torch.device("cpu")
DTYPES = ("fp32", "int8", "fp16")
METHODS = ("linear", "vqt", "synqt", "dtl_plus")
EPOCHS = {"linear": 20, "vqt": 6, "synqt": 5, "dtl_plus": 1}
OFFLINE = {"mnist": 28, "fashion_mnist": 28, "digits": 32}  # task -> image size written (the backbone resizes)
OTHER = SCALE_LAYOUTS[1]  # the int8 layout caches do not store, measured in memory
SHOWN = ("fp32", "fp16", "int8")  # column order of the tables
VITB = {"depth": 12, "heads": 12, "tokens": 197, "head_dim": 64, "dim": 768}  # ViT-B/16 at 224 px


class Replay:
    """A backbone whose ``trace`` gives the next rows of an fp32 cache of the same listing instead of running: the
    build of another dtype then stores exactly what it would store from a trace."""

    def __init__(self, backbone: Backbone, source: TapCache):
        self._backbone, self._source, self._next = backbone, source, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backbone, name)

    def trace(self, images: torch.Tensor, blocks: Any = None, points: Any = ()) -> Taps:
        rows = np.arange(self._next, self._next + len(images))
        self._next += len(images)
        return self._source.taps(rows, tuple(blocks), CPU, points=points)


class Requantised:
    """A cache's batches with K/V or block points passed through int8 in memory (a layout no cache stores)."""

    def __init__(self, source: CachedBatches, layout: str, part: str):
        self.source, self.layout, self.part = source, layout, part

    def __len__(self) -> int:
        return len(self.source)

    def labels(self) -> list[int]:
        return self.source.labels()

    def iterate(self, order: list[int], batch_size: int, device: torch.device) -> Iterator[tuple[Taps, torch.Tensor]]:
        for taps, y in self.source.iterate(order, batch_size, device):
            keys, values, points = list(taps.keys), list(taps.values), dict(taps.points)
            if self.part == "kv":
                for j in range(len(keys)):
                    keys[j], values[j] = roundtrip(torch.stack([keys[j], values[j]], 1), self.layout).unbind(1)
            else:
                points = {p: [point_roundtrip(t, self.layout) for t in ts] for p, ts in points.items()}
            yield Taps(keys, values, taps.pooled, taps.blocks, points), y

    def forward(self, model: TunedModel, taps: Taps) -> torch.Tensor:
        return model.forward_taps(taps)


def point_roundtrip(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A block point (B, N, C) through int8: per channel over the tokens, or per token over the channels."""
    return roundtrip(t[:, None, None], layout)[:, 0, 0]


def relative_errors(x: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """||back - x|| / ||x|| of every vector along the last axis (a token's key or value in one head)."""
    return (back - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)


def kv_errors(cache: TapCache, rows: np.ndarray, blocks: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per block, for K and V: mean and max relative error of a token's vector per head, int8 in both layouts and
    fp16 for reference, and the relative error of the whole tensor."""
    out = []
    for b in blocks:
        acc: dict[str, list[torch.Tensor]] = {}
        for part in np.array_split(rows, max(1, len(rows) // 100)):
            k, v = cache.read_block(b, part, CPU)
            kv = torch.stack([k, v], 1)
            backs = {f"int8-{lay}": roundtrip(kv, lay) for lay in SCALE_LAYOUTS} | {"fp16": kv.half().float()}
            for name, back in backs.items():
                for p, kvname in enumerate("KV"):
                    acc.setdefault(f"{name} {kvname}", []).append(relative_errors(kv[:, p], back[:, p]).flatten())
                    acc.setdefault(f"{name} {kvname} sq", []).append(
                        torch.stack([(back[:, p] - kv[:, p]).square().sum(), kv[:, p].square().sum()]))
        rec: dict[str, Any] = {"block": b}
        for key, parts in acc.items():
            if key.endswith(" sq"):
                err, ref = torch.stack(parts).sum(0)
                rec[key.removesuffix(" sq") + " tensor"] = float((err / ref).sqrt())
            else:
                rel = torch.cat(parts)
                rec[key + " mean"], rec[key + " max"] = float(rel.mean()), float(rel.max())
        out.append(rec)
    return out


def point_errors(cache: TapCache, rows: np.ndarray, points: tuple) -> dict[str, float]:
    errs: dict[str, list[torch.Tensor]] = {}
    for p in points:
        for b in p.blocks:
            x = cache.read_point(p, b, rows, CPU)
            for lay in SCALE_LAYOUTS:
                errs.setdefault(lay, []).append(relative_errors(x, point_roundtrip(x, lay)).flatten())
    return {f"int8-{lay} {stat}": float(getattr(torch.cat(e), stat)()) for lay, e in errs.items()
            for stat in ("mean", "max")}


def sizes(manifest: dict[str, Any]) -> dict[str, int]:
    """Bytes per image of a cache's K/V (with scales), pooled feature and block points."""
    files = manifest["files"]
    kv = {n: f for n, f in files.items() if n.startswith("block_")}
    points = {n: f for n, f in files.items() if n.startswith("point_")}
    return {"kv": bytes_per_row(kv), "pooled": bytes_per_row({POOLED: files[POOLED]}),
            "points": bytes_per_row(points), "total": manifest["bytes_per_sample"]}


def vitb_sizes() -> dict[str, int]:
    """Bytes per image of a ViT-B/16 224 px cache (all 12 blocks and the pooled feature), from the shapes alone."""
    out = {}
    for dtype in DTYPES:
        floats = 4 if dtype == "fp32" else 2
        out[dtype] = bytes_per_row(kv_files(VITB, 1, dtype, range(12))) + VITB["dim"] * floats
    other = SCALE_LAYOUTS[1]
    out[f"int8-{other}"] = bytes_per_row(kv_files(VITB, 1, "int8", range(12), other)) + VITB["dim"] * 2
    return out


def train_config(method: str, epochs: int) -> TrainConfig:
    _, recipe = method_recipe(method)
    return TrainConfig(**{**recipe, "epochs": epochs, "warmup_epochs": epochs / 5, "seed": 0, "progress": False,
                          "device": "cpu"})


def build(out: Path, backbone: Backbone | Replay, listing: Listing, dtype: str, blocks: tuple, points: tuple,
          ) -> TapCache:
    shutil.rmtree(out, ignore_errors=True)
    build_cache(out, backbone, [listing], dtype=dtype, blocks=blocks, points=points, progress=False)
    return TapCache(out)


def float_digests(cache: TapCache) -> dict[str, list[str]]:
    """The per-chunk checksums of a cache's pooled feature and block points: equal digests, equal bytes."""
    names = [POOLED] + [point_file(p, blk) for p in cache.points for blk in p.blocks]
    return {n: cache.manifest["digests"][n] for n in names}


def logits_of(model: TunedModel, batches: Any, method: str) -> torch.Tensor:
    cfg = TrainConfig(batch_size=128 if method != "dtl_plus" else 64, progress=False, device="cpu")
    [logits], _ = predict([model], batches, cfg)
    return logits


def groups_of(backbone: Backbone, methods: list[str], classes: int) -> list[tuple[list[str], tuple, tuple]]:
    """(methods, blocks, points) of the caches a task needs: one of K/V (and the pooled feature) for the methods
    reading K/V and the linear probe, one of block points for the others (DTL+): two smaller caches on disk at a
    time instead of one holding both."""
    built = {m: TunedModel.build(backbone, m, classes) for m in methods}
    kv = [m for m in methods if not built[m].points_read()]
    pts = [m for m in methods if built[m].points_read()]
    out = []
    if kv:
        out.append((kv, tuple(range(backbone.depth)), ()))
    if pts:
        out.append((pts, (), tuple(dict.fromkeys(p for m in pts for p in built[m].points_read()))))
    return out


def run_task(name: str, train: Listing, test: Listing, backbone: Backbone, args: argparse.Namespace,
             out: Path) -> dict[str, Any]:
    classes = max(train.labels + test.labels) + 1
    groups = groups_of(backbone, [m for m in args.methods.split(",") if m], classes)
    res: dict[str, Any] = {"task": name, "classes": classes, "train": len(train.samples), "test": len(test.samples),
                           "runs": {}, "sizes": {}, "int8_floats_equal_fp16": True}
    models: dict[tuple[str, str], TunedModel] = {}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - START:6.0f} s] {name}: {msg}", flush=True)

    def same_floats(digests: dict[str, dict[str, list[str]]]) -> None:
        res["int8_floats_equal_fp16"] &= digests["int8"] == digests["fp16"]

    # -- training: one fp32 trace, the other dtypes replayed from it one at a time (disk), every method on each;
    # an int8 cache gives the methods that read no K/V fp16's bytes, so those run on fp16 only (checked) --
    for methods, blocks, points in groups:
        t = time.perf_counter()
        fp32 = build(out / "train-fp32", backbone, train, "fp32", blocks, points)
        res["trace_seconds"] = res.get("trace_seconds", 0) + time.perf_counter() - t
        log(f"fp32 train cache of {', '.join(methods)} traced in {time.perf_counter() - t:.0f} s")
        digests = {}
        for dtype in DTYPES:
            cache = fp32 if dtype == "fp32" else build(out / f"train-{dtype}", Replay(backbone, fp32), train, dtype,
                                                        blocks, points)
            digests[dtype] = float_digests(cache)
            for k, v in sizes(cache.manifest).items():
                res["sizes"].setdefault(dtype, {})[k] = res["sizes"].get(dtype, {}).get(k, 0) + v
            for method in methods:
                if dtype == "int8" and not blocks:
                    continue
                model = TunedModel.build(backbone, method, classes, seed=0)
                cfg = train_config(method, EPOCHS[method] if args.epochs is None else args.epochs)
                batches = CachedBatches(cache, train, model.blocks_read(), points=model.points_read())
                c0, w0 = time.process_time(), time.perf_counter()
                fit(model, batches, cfg)
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                models[method, dtype] = model
                res["runs"].setdefault(method, {})[dtype] = {"cpu_s_per_epoch": cpu / cfg.epochs,
                                                             "wall_s_per_epoch": wall / cfg.epochs,
                                                             "epochs": cfg.epochs}
                log(f"{method} trained on {dtype}: {cpu / cfg.epochs:.2f} CPU s/epoch")
            if dtype != "fp32":
                del cache
                shutil.rmtree(out / f"train-{dtype}")
        same_floats(digests)
        del fp32
        shutil.rmtree(out / "train-fp32")

    # -- test, in shards (disk): fp32 first (the reference, the errors, the layouts not stored), then int8, fp16 --
    logits: dict[tuple[str, str], list[torch.Tensor]] = {}
    for shard in range(0, len(test.samples), args.shard):
        part = replace(test, samples=test.samples[shard:shard + args.shard])
        for methods, blocks, points in groups:
            fp32 = build(out / "test-fp32", backbone, part, "fp32", blocks, points)
            if shard == 0 and blocks:
                rows = np.arange(min(len(part.samples), args.error_images))
                res["error_images"] = len(rows)
                res["kv_errors"] = kv_errors(fp32, rows, blocks)
            if shard == 0 and points:
                res["point_errors"] = point_errors(fp32, np.arange(min(len(part.samples), args.error_images)),
                                                   points)
            for method in methods:
                model = models[method, "fp32"]
                batches = CachedBatches(fp32, part, model.blocks_read(), points=model.points_read())
                logits.setdefault((method, "fp32"), []).append(logits_of(model, batches, method))
                kind = "points" if points else "kv"
                if method != "linear":  # what storing int8 the other way would change, for the same weights
                    layout = "channel" if points else OTHER
                    logits.setdefault((method, f"same weights, {kind} int8-{layout}"), []).append(
                        logits_of(model, Requantised(batches, layout, kind), method))
            digests = {}
            for dtype in ("int8", "fp16"):
                cache = build(out / f"test-{dtype}", Replay(backbone, fp32), part, dtype, blocks, points)
                digests[dtype] = float_digests(cache)
                for method in methods:
                    trained = models.get((method, dtype))
                    if trained is None:
                        continue
                    model = models[method, "fp32"]
                    batches = CachedBatches(cache, part, model.blocks_read(), points=model.points_read())
                    logits.setdefault((method, f"same weights, {dtype}"), []).append(
                        logits_of(model, batches, method))
                    logits.setdefault((method, dtype), []).append(logits_of(trained, batches, method))
                del cache
                shutil.rmtree(out / f"test-{dtype}")
            same_floats(digests)
            del fp32
            shutil.rmtree(out / "test-fp32")
        log(f"test images {shard}-{shard + len(part.samples) - 1} done")

    labels = torch.tensor(test.labels)
    for (method, kind), parts in logits.items():
        run, got = res["runs"][method], torch.cat(parts)
        if kind == "fp32":
            run["fp32"]["accuracy"] = float((got.argmax(1) == labels).float().mean() * 100)
            run["logit_scale"] = float(got.abs().amax())
        elif kind in DTYPES:
            trained = diff(got, torch.cat(logits[method, "fp32"]), labels)
            run[kind] |= {"accuracy": trained["accuracy"], "trained": trained}
        else:
            run[kind] = diff(got, torch.cat(logits[method, "fp32"]), labels)
    for method, run in res["runs"].items():
        if "int8" not in run:  # reads no K/V: an int8 cache gives it fp16's bytes (int8_floats_equal_fp16)
            run["int8"] = {**run["fp16"], "as_fp16": True}
            run["same weights, int8"] = {**run["same weights, fp16"], "as_fp16": True}
    return res


def diff(logits: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """How far logits are from the reference: max |difference|, predictions changed, accuracy."""
    return {"max_abs_logit_diff": float((logits - ref).abs().amax()),
            "changed_predictions": int((logits.argmax(1) != ref.argmax(1)).sum()),
            "accuracy": float((logits.argmax(1) == labels).float().mean() * 100)}


def tasks_of(args: argparse.Namespace) -> dict[str, tuple[Listing, Listing]]:
    out: dict[str, tuple[Listing, Listing]] = {}
    for task in [t for t in args.tasks.split(",") if t]:
        if task == "flowers102":
            root = Path(args.flowers)
            test = read_split(root / "test.txt")
            test = replace(test, samples=test.samples[::args.flowers_stride][:args.test_size])
            out[task] = (read_split(root / "train800val200.txt"), test)
        else:
            d = make_offline_benchmark(Path(args.out) / "data", seed=0, tasks=[task], image_size=OFFLINE[task],
                                       test_size=args.test_size)[0]
            out[task] = (read_split(d / "train800val200.txt"), read_split(d / "test.txt"))
        train, test = out[task]
        out[task] = (replace(train, samples=train.samples[:args.train_size]), test)
        if args.limit:
            train, test = out[task]
            out[task] = (replace(train, samples=train.samples[:args.limit]),
                         replace(test, samples=test.samples[:args.limit]))
    return out


def tables(results: list[dict[str, Any]]) -> str:
    lines = []
    vb = results[0]["vitb_bytes_per_image"] if results else vitb_sizes()
    s = results[0]["sizes"]
    lines += ["| storage | ViT-Ti/16 K/V (+ scales) per image, measured | ViT-B/16 224 px K/V + pooled, from shapes |",
              "|---|---|---|"]
    for dtype in SHOWN:
        lines.append(f"| {dtype} | {s[dtype]['kv'] / 1e6:.3f} MB | {vb[dtype] / 1e6:.3f} MB |")
    lines.append(f"| int8, {OTHER} scales (not stored) | - | {vb[f'int8-{OTHER}'] / 1e6:.3f} MB |")
    lines.append("")
    for r in results:
        lines += [f"Quantisation error per block, {r['task']} ({r['error_images']} test images): relative error of "
                  "a token's key or value vector in one head, mean / max",
                  "| block | K int8 channel | K int8 token | V int8 channel | V int8 token | K fp16 | V fp16 |",
                  "|---|---|---|---|---|---|---|"]
        for e in r["kv_errors"]:
            cells = [f"{e[f'{n} {p} mean']:.4f} / {e[f'{n} {p} max']:.3f}" for p, n in
                     (("K", "int8-channel"), ("K", "int8-token"), ("V", "int8-channel"), ("V", "int8-token"))]
            cells += [f"{e[f'fp16 {p} mean']:.5f}" for p in "KV"]
            lines.append(f"| {e['block']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| task | method | acc fp32 | acc fp16 | acc int8 | int8 - fp32 | max abs logit diff, same weights: "
              f"fp16 / int8 / int8 {OTHER} scales (DTL+: points int8) | trained on int8: max abs logit diff "
              "(changed predictions) | logit scale |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for m, run in r["runs"].items():
            other = next((v for k, v in run.items() if k.startswith("same weights, kv") or
                          k.startswith("same weights, points")), None)
            sw = " / ".join(f"{run[k]['max_abs_logit_diff']:.4f}" for k in ("same weights, fp16", "same weights, int8")
                            ) + (f" / {other['max_abs_logit_diff']:.4f}" if other else " / -")
            tr = run["int8"].get("trained", {})
            mark = " (= fp16)" if run["int8"].get("as_fp16") else ""
            lines.append(
                f"| {r['task']} | {m} | {run['fp32']['accuracy']:.1f} | {run['fp16']['accuracy']:.1f} | "
                f"{run['int8']['accuracy']:.1f}{mark} | {run['int8']['accuracy'] - run['fp32']['accuracy']:+.1f} | "
                f"{sw} | {tr.get('max_abs_logit_diff', float('nan')):.4f} ({tr.get('changed_predictions', '-')}) | "
                f"{run['logit_scale']:.1f} |")
    lines += ["", "| method | CPU s/epoch fp32 | fp16 | int8 |", "|---|---|---|---|"]
    for m in results[0]["runs"] if results else ():
        cells = []
        for dtype in SHOWN:
            vals = [r["runs"][m][dtype]["cpu_s_per_epoch"] for r in results]
            cells.append(f"{np.mean(vals):.2f}" + (" (= fp16)" if results[0]["runs"][m][dtype].get("as_fp16") else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


START = time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a backbone folder in timm's hub layout")
    p.add_argument("--flowers", help="a VTAB-1k task folder of Flowers102 (qtune data vtab oxford_flowers102)")
    p.add_argument("--tasks", default="mnist,fashion_mnist,digits,flowers102")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--test-size", type=int, default=1000, help="test images per task")
    p.add_argument("--flowers-stride", type=int, default=6, help="Flowers102's test subset: every Nth image")
    p.add_argument("--error-images", type=int, default=500, help="test images the per-block errors are taken on")
    p.add_argument("--train-size", type=int, default=1000, help="training images per task (train800val200's first)")
    p.add_argument("--shard", type=int, default=500, help="test images per cache (caches are deleted after use)")
    p.add_argument("--epochs", type=int, help="every method's epochs (default: %s)" % EPOCHS)
    p.add_argument("--limit", type=int, help="images per split (a smoke test)")
    p.add_argument("--out", default="runs/cache-int8", help="data and (temporary) caches")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    backbone = load_backbone(None, args.weights)
    results = []
    for name, (train, test) in tasks_of(args).items():
        r = run_task(name, train, test, backbone, args, out / "cache")
        r["vitb_bytes_per_image"] = vitb_sizes()
        results.append(r)
        if args.json:
            write_json(Path(args.json), {"results": results, "args": vars(args), "epochs": EPOCHS,
                                         "seconds": time.perf_counter() - START, "provenance": provenance(CPU)})
    print(tables(results))
    print(f"\n{time.perf_counter() - START:.0f} s")


if __name__ == "__main__":
    main()
