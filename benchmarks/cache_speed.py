"""TapCache benchmark: SynQT trained live vs from a cache, on this machine's CPU; memory with and without
--stream-blocks; accuracy from half-precision caches. Results are printed and written as JSON; docs/cache.md
quotes them with the commands that made them.

  python benchmarks/cache_speed.py speed --config demo --images 1000 --epochs 50
  python benchmarks/cache_speed.py speed --config vitb --images 128 --epochs 50 --live-epochs 5
  python benchmarks/cache_speed.py memory --config vitb --batch-size 64
  python benchmarks/cache_speed.py accuracy --config demo --tasks texture_patch --lr 3e-3 --epochs 50

Every measurement runs in a fresh subprocess (so its peak RSS is its own) with one torch thread (--threads).
Backbones have random weights (timing and memory do not depend on the values); `accuracy` takes --weights.
  demo: vit_tiny_patch16_224 with img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3 (65 tokens)
  vitb: vit_base_patch16_224 (224 px, 197 tokens, 12 blocks, width 768)
Phases of `speed`: `frozen` (one frozen pass over the images: decode + trace, the unit of cost), `live` (SynQT
trained live: every epoch traces every image), `build` (the cache: one frozen pass + writing), `cached` (SynQT
trained from the cache), `query` (the same training from pre-gathered in-RAM taps: the query path's own compute).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS: dict[str, dict[str, Any]] = {
    "demo": {"name": "vit_tiny_patch16_224", "image_size": 32,
             "model_args": {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 3}},
    "vitb": {"name": "vit_base_patch16_224", "image_size": 224, "model_args": {}},
}


# ----------------------------------------------------------------------------------------------------------------
# measurement helpers (run inside a phase subprocess)

class RssSampler:
    """Peak anonymous and total RSS, sampled every few ms from /proc (ru_maxrss also counts the cache's
    memory-mapped pages, which are clean page cache the kernel can drop, not memory the run needs)."""

    def __init__(self, every: float = 0.002):
        self.every, self.peak_anon, self.peak_rss = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> tuple[int, int]:
        anon = rss = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
        return anon, rss

    def _run(self) -> None:
        while not self._stop.is_set():
            anon, rss = self.read()
            self.peak_anon, self.peak_rss = max(self.peak_anon, anon), max(self.peak_rss, rss)
            time.sleep(self.every)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _backbone(cfg: dict[str, Any], weights: str | None = None):
    """The config's random-weight backbone, or a local pretrained one (a weights folder in timm's hub layout)."""
    from qtune.backbones import load_backbone

    if weights:
        return load_backbone(None, weights)
    return load_backbone(cfg["name"], model_args=cfg["model_args"])


def _train_cfg(args: argparse.Namespace, epochs: int):
    from qtune.engine.config import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=1e-3, weight_decay=1e-2,
                       warmup_epochs=min(10, epochs - 1) if epochs > 1 else 0, progress=False, seed=0)


def _model(backbone, tokens: int, num_classes: int):
    from qtune.tuned import TunedModel

    return TunedModel.build(backbone, "synqt", num_classes, {"tokens": tokens}, seed=0)


class FixedBatches:
    """One epoch of taps gathered into RAM before timing, replayed every epoch: training with no reading at all."""

    def __init__(self, source, batch_size: int):
        import torch

        self.n = len(source)
        self.batches = list(source.iterate(list(range(self.n)), batch_size, torch.device("cpu")))

    def __len__(self) -> int:
        return self.n

    def iterate(self, order, batch_size, device):
        return iter(self.batches)

    def forward(self, model, taps):
        return model.forward_taps(taps)


def phase(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    import torch

    torch.set_num_threads(args.threads)
    from qtune.cache import CachedBatches, TapCache, build_cache
    from qtune.data import ImageDataset, read_split
    from qtune.data.batches import ImageBatches
    from qtune.engine.loop import fit

    cfg = CONFIGS[args.config]
    work = Path(args.work)
    listing = read_split(work / "images")
    backbone = _backbone(cfg)
    classes = len(listing.classes)
    out: dict[str, Any] = {"phase": args.phase}
    with RssSampler(every=0.01) as rss:
        start, cpu_start = time.perf_counter(), time.process_time()
        if args.phase == "frozen":
            batches = ImageBatches(ImageDataset(listing, backbone.preprocessing.transform()))
            for images, _ in batches.iterate(list(range(len(batches))), args.batch_size, torch.device("cpu")):
                backbone.trace(images)
        elif args.phase == "live":
            batches = ImageBatches(ImageDataset(listing, backbone.preprocessing.transform()))
            fit(_model(backbone, args.tokens, classes), batches, _train_cfg(args, args.live_epochs))
        elif args.phase == "build":
            build_cache(work / f"cache_{args.dtype}", backbone, [listing], dtype=args.dtype,
                        batch_size=args.batch_size, progress=False, overwrite=True)
            out["cache_bytes"] = TapCache(work / f"cache_{args.dtype}").nbytes
        elif args.phase in ("cached", "query"):
            model = _model(backbone, args.tokens, classes)
            source = CachedBatches(TapCache(work / f"cache_{args.dtype}"), listing, model.blocks_read(),
                                   stream=args.stream)
            if args.phase == "query":
                source = FixedBatches(source, args.batch_size)
                start, cpu_start = time.perf_counter(), time.process_time()
            fit(model, source, _train_cfg(args, args.epochs))
        out["seconds"] = time.perf_counter() - start
        out["cpu_seconds"] = time.process_time() - cpu_start
    out.update(peak_rss_sampled=rss.peak_rss, peak_anon_rss_sampled=rss.peak_anon, ru_maxrss=_maxrss())
    return out


def memory_phase(args: argparse.Namespace) -> dict[str, Any]:
    """A few cached SynQT steps at one batch size, with or without depth streaming: measured peak anonymous RSS,
    and the CPU account (weights, trainable state, the batch's K/V resident at the peak, saved activations)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    from qtune.cache import CachedBatches, TapCache
    from qtune.data import read_split
    from qtune.engine.loop import fit
    from qtune.memory import SavedTensors

    cfg = CONFIGS[args.config]
    work = Path(args.work)
    listing = read_split(work / "images")
    backbone = _backbone(cfg)
    model = _model(backbone, args.tokens, len(listing.classes))
    cache = TapCache(work / f"cache_{args.dtype}")
    batches = CachedBatches(cache, listing, model.blocks_read(), stream=args.stream, prefetch=not args.no_prefetch)
    base_anon, _ = RssSampler.read()
    with RssSampler(every=0.001) as rss:
        fit(model, batches, _train_cfg(args, 1))  # one epoch: len(images) / batch steps, with AdamW state
    # saved-for-backward bytes of one step (outside checkpointed blocks when streaming)
    model.train()
    (taps, y), = batches.iterate(list(range(args.batch_size)), args.batch_size, torch.device("cpu"))
    with SavedTensors(model.parameters()) as rec:
        loss = F.cross_entropy(model.forward_taps(taps), y)
    loss.backward()
    del taps, loss
    b, blocks = args.batch_size, model.blocks_read()
    kv_block = b * backbone.kv_bytes_per_sample([0], bytes_per_value=4)  # fp32 K/V of one block for the batch
    trainable = sum(p.numel() * p.element_size() for p in model.trainable_parameters().values())
    frozen = sum(p.numel() * p.element_size() for p in backbone.parameters())
    account = {
        "frozen_weights": frozen,
        "trainable_params_grads_adamw": 4 * trainable,
        "batch_kv_resident_peak": kv_block * (1 if args.stream else len(blocks)),
        "saved_activations_outside_kv": rec.activation_bytes - (0 if args.stream else kv_block * len(blocks)),
    }
    account["total"] = sum(account.values())
    return {"phase": "memory", "stream": args.stream, "prefetch": not (args.no_prefetch or args.stream),
            "batch_size": b, "steps": len(listing.samples) // b,
            "peak_anon_rss_sampled": rss.peak_anon, "anon_rss_before_training": base_anon,
            "ru_maxrss": _maxrss(), "cpu_account": account}


def accuracy_phase(args: argparse.Namespace) -> dict[str, Any]:
    """SynQT on one offline task from fp32, fp16 and bf16 caches, same seeds and batch order: test accuracy, and how
    many test predictions a half-precision cache changes against the fp32 cache with the same seed."""
    import torch

    torch.set_num_threads(args.threads)
    from qtune.cache import CachedBatches, TapCache, build_cache
    from qtune.data import read_list_file
    from qtune.engine.loop import fit
    from qtune.engine.predict import predict

    cfg = CONFIGS[args.config]
    task = Path(args.work) / args.task
    train = read_list_file(task / "train800val200.txt")
    test = read_list_file(task / "test.txt", num_classes=len(train.classes))
    backbone = _backbone(cfg, args.weights)
    seeds = [int(x) for x in args.seeds.split(",")]
    res: dict[str, Any] = {"phase": "accuracy", "task": args.task, "weights": args.weights,
                           "weights_hash": backbone.identity.weights_hash[:12], "lr": args.lr, "seeds": seeds}
    preds: dict[tuple[str, int], torch.Tensor] = {}
    for dtype in ("fp32", "fp16", "bf16"):
        path = Path(args.work) / f"cache_{args.task}_{dtype}"
        build_cache(path, backbone, [train, test], dtype=dtype, batch_size=args.batch_size, progress=False,
                    overwrite=True)
        cache = TapCache(path)
        for seed in seeds:
            model = _model(backbone, args.tokens, len(train.classes))
            tc = _train_cfg(args, args.epochs)
            tc.seed, tc.lr = seed, args.lr
            torch.manual_seed(seed)
            fit(model, CachedBatches(cache, train, model.blocks_read()), tc)
            [logits], labels = predict([model], CachedBatches(cache, test, model.blocks_read()), tc)
            preds[dtype, seed] = logits.argmax(1)
            res[f"{dtype}_seed{seed}"] = (preds[dtype, seed] == labels).float().mean().item()
            if dtype != "fp32":
                res[f"{dtype}_seed{seed}_changed_predictions"] = (preds[dtype, seed] != preds["fp32", seed]).float(
                    ).mean().item()
        res[f"{dtype}_cache_bytes"] = cache.nbytes
    return res


# ----------------------------------------------------------------------------------------------------------------
# drivers (spawn the phases)

def _run_phase(args: argparse.Namespace, name: str, **extra: Any) -> dict[str, Any]:
    argv = [sys.executable, __file__, "_phase", "--phase", name, "--config", args.config, "--work", str(args.work),
            "--batch-size", str(args.batch_size), "--tokens", str(args.tokens), "--threads", str(args.threads),
            "--dtype", args.dtype, "--epochs", str(args.epochs), "--live-epochs", str(extra.pop("live_epochs", 1))]
    if args.weights:
        argv += ["--weights", str(args.weights)]
    argv += ["--lr", str(args.lr), "--seeds", args.seeds]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}"] if v is True else ([] if v is False else [f"--{k.replace('_', '-')}",
                                                                                          str(v)])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {name}{' ' + str(extra) if extra else ''}: {json.dumps(result)}", flush=True)
    return result


def _make_images(args: argparse.Namespace) -> None:
    from qtune.data.synthetic import make_shapes

    folder = Path(args.work) / "images"
    if not folder.exists():
        make_shapes(folder, num_classes=4, per_class=args.images // 4, size=CONFIGS[args.config]["image_size"])


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def speed(args: argparse.Namespace) -> dict[str, Any]:
    _make_images(args)
    load = os.getloadavg()
    live_epochs = args.live_epochs or args.epochs
    frozen = _run_phase(args, "frozen")
    build = _run_phase(args, "build")
    cached = _run_phase(args, "cached")
    query = _run_phase(args, "query")
    live = _run_phase(args, "live", live_epochs=live_epochs)
    scale = args.epochs / live_epochs
    # CPU seconds of the process (all its threads): on a shared machine they do not count time spent waiting for
    # a core, so ratios hold under load. Wall seconds are reported next to them.
    live_total, live_wall = live["cpu_seconds"] * scale, live["seconds"] * scale
    cached_total = build["cpu_seconds"] + cached["cpu_seconds"]
    cached_wall = build["seconds"] + cached["seconds"]
    p, q = frozen["cpu_seconds"], query["cpu_seconds"]
    summary = {
        "config": args.config, "images": args.images, "epochs": args.epochs, "live_epochs_measured": live_epochs,
        "batch_size": args.batch_size, "tokens": args.tokens, "dtype": args.dtype, "threads": args.threads,
        "load_average_at_start": load, "load_average_at_end": os.getloadavg(),
        "frozen_pass_cpu_s": p, "live_cpu_s": live_total, "cache_build_cpu_s": build["cpu_seconds"],
        "cached_train_cpu_s": cached["cpu_seconds"], "cached_total_cpu_s": cached_total, "query_only_cpu_s": q,
        "frozen_pass_wall_s": frozen["seconds"], "live_wall_s": live_wall, "cached_total_wall_s": cached_wall,
        "query_only_wall_s": query["seconds"],
        "speedup_live_over_cached": live_total / cached_total,
        "speedup_live_over_cached_wall": live_wall / cached_wall,
        "cached_in_frozen_passes": cached_total / p, "live_in_frozen_passes": live_total / p,
        "query_in_frozen_passes_per_epoch": q / args.epochs / p,
        "cached_over_frozen_plus_query": cached_total / (p + q),
        "cache_bytes": build["cache_bytes"], "cached_peak_rss": cached["ru_maxrss"],
        "cached_peak_anon_rss": cached["peak_anon_rss_sampled"], "live_peak_rss": live["ru_maxrss"],
        "phases": {"frozen": frozen, "build": build, "cached": cached, "query": query, "live": live},
    }
    scaled = "" if live_epochs == args.epochs else f" ({live_epochs} epochs measured, x{scale:g})"
    print(f"\n{args.config}, {args.images} images, SynQT {args.tokens} tokens, {args.epochs} epochs, batch "
          f"{args.batch_size}, {args.dtype} cache, {args.threads} thread(s); CPU seconds (wall):")
    print(f"  one frozen pass       {p:8.1f} s ({frozen['seconds']:.1f})")
    print(f"  live                  {live_total:8.1f} s ({live_wall:.1f}){scaled} = {live_total / p:.1f} frozen passes")
    print(f"  cached (build+train)  {cached_total:8.1f} s ({cached_wall:.1f}) = {build['cpu_seconds']:.1f} + "
          f"{cached['cpu_seconds']:.1f} = {cached_total / p:.2f} frozen passes; {live_total / cached_total:.1f}x "
          f"faster than live ({live_wall / cached_wall:.1f}x wall)")
    print(f"  query path alone      {q:8.1f} s ({query['seconds']:.1f}) = {q / args.epochs / p:.3f} frozen passes per "
          f"epoch; cached / (frozen + query) = {summary['cached_over_frozen_plus_query']:.2f}")
    print(f"  cache {_mb(build['cache_bytes'])} on disk; cached training peak RSS {_mb(cached['ru_maxrss'])} "
          f"(anonymous {_mb(cached['peak_anon_rss_sampled'])}); live peak RSS {_mb(live['ru_maxrss'])}")
    return summary


def memory(args: argparse.Namespace) -> dict[str, Any]:
    args.images = max(args.images, 2 * args.batch_size)
    _make_images(args)
    if not (Path(args.work) / f"cache_{args.dtype}" / "manifest.json").is_file():
        _run_phase(args, "build")
    runs = {"default": _run_phase(args, "memory"), "no_prefetch": _run_phase(args, "memory", no_prefetch=True),
            "stream_blocks": _run_phase(args, "memory", stream=True)}
    print(f"\n{args.config} cached SynQT, batch {args.batch_size}, {args.dtype} cache (K/V read as fp32):")
    for name, r in runs.items():
        acc = r["cpu_account"]
        print(f"  {name:<13} account {_mb(acc['total'])} (frozen {_mb(acc['frozen_weights'])}, trainable+grads+"
              f"AdamW {_mb(acc['trainable_params_grads_adamw'])}, K/V resident {_mb(acc['batch_kv_resident_peak'])}"
              f", other saved {_mb(acc['saved_activations_outside_kv'])}); measured peak anonymous RSS "
              f"{_mb(r['peak_anon_rss_sampled'])} (before training {_mb(r['anon_rss_before_training'])})")
    return {"config": args.config, "batch_size": args.batch_size, "dtype": args.dtype, "runs": runs}


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from qtune.data.offline import make_offline_benchmark

    tasks = args.tasks.split(",")
    make_offline_benchmark(Path(args.work), seed=0, tasks=tasks, image_size=CONFIGS[args.config]["image_size"])
    results = {t: _run_phase(args, "accuracy", task=t) for t in tasks}
    print(f"\nSynQT test accuracy from fp32 / fp16 / bf16 caches ({args.weights or args.config}, lr {args.lr}, "
          f"{args.epochs} epochs), seeds {args.seeds}:")
    for t, r in results.items():
        for d in ("fp32", "fp16", "bf16"):
            accs = [r[f"{d}_seed{s}"] for s in r["seeds"]]
            changed = "" if d == "fp32" else "; test predictions changed vs fp32: " + ", ".join(
                f"{r[f'{d}_seed{s}_changed_predictions']:.3f}" for s in r["seeds"])
            print(f"  {t:<14} {d}: " + ", ".join(f"{a:.3f}" for a in accs) + f" (mean {sum(accs) / len(accs):.3f})"
                  + changed)
    return {"config": args.config, "weights": args.weights, "epochs": args.epochs, "lr": args.lr, "seeds": args.seeds,
            "tasks": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("speed", "memory", "accuracy", "_phase"))
    p.add_argument("--config", choices=sorted(CONFIGS), default="demo")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--live-epochs", type=int, default=0, help="measure live training on fewer epochs, scale up")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tasks", default="texture_patch")
    p.add_argument("--lr", type=float, default=3e-3, help="accuracy: SynQT learning rate")
    p.add_argument("--seeds", default="0,1,2", help="accuracy: training seeds")
    p.add_argument("--weights", help="a local pretrained backbone (folder or file) instead of random weights")
    p.add_argument("--work", type=Path, help="scratch folder (default /tmp/qtune_cache_bench_<config>)")
    p.add_argument("--out", type=Path, help="write the summary JSON here")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-prefetch", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.work = args.work or Path(f"/tmp/qtune_cache_bench_{args.config}")
    if args.command == "_phase":
        fn = {"memory": memory_phase, "accuracy": accuracy_phase}.get(args.phase, phase)
        print(json.dumps(fn(args)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    summary = {"speed": speed, "memory": memory, "accuracy": accuracy}[args.command](args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
