"""FractalDB-style images: classes defined by formulas, so pre-training needs no natural image.

Kataoka et al. 2020, "Pre-training without Natural Images" (ACCV) make each class one random iterated function system
(IFS), keep it only if its attractor fills enough of the image (the filling-rate check), render images with the chaos
game and vary them within a class by scaling one IFS parameter by a weight around 1. Nakashima et al. 2022, "Can Vision
Transformers Learn without Natural Images?" (AAAI) show that ViTs pre-trained this way transfer. The affine maps are
sampled as in Anderson & Farrell 2022, "Improving Fractal Pre-training" (WACV): through their singular values, with the
"sigma factor" sum(s1 + 2 s2) in a band that yields contractive systems whose attractors are neither dust nor lines.

Rendering is vectorised over many chaos-game walkers and over a batch of images at once, so one CPU core renders a few
hundred 32x32 images per second.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from qtune.io import atomic_write, write_text

MIN_MAPS, MAX_MAPS = 2, 4
FILL_GRID = 48  # resolution of the filling-rate check
FILL_THRESHOLD = 0.15  # share of that grid the attractor must cover, aspect kept (FractalDB: 0.2 at its resolution)


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _random_system(rng: np.random.Generator) -> np.ndarray:
    """One IFS as rows (a, b, c, d, e, f, p): x' = [[a, b], [c, d]] x + (e, f), chosen with probability p."""
    n = int(rng.integers(MIN_MAPS, MAX_MAPS + 1))
    alpha = rng.uniform(0.5 * (5 + n), 0.5 * (6 + n))  # sigma factor band of Anderson & Farrell
    share = rng.dirichlet(np.full(n, 4.0)) * alpha
    share = np.clip(share, 0.3, 2.9)
    rows = []
    for b in share:
        s1 = rng.uniform(max(b / 3, b - 2.0), min(0.98, b))  # s2 = (b - s1) / 2 <= s1 <= 1
        s2 = max((b - s1) / 2, 0.02)
        reflect = np.diag([rng.choice([-1.0, 1.0]), 1.0])
        a = _rotation(rng.uniform(0, 2 * np.pi)) @ np.diag([s1, s2]) @ reflect @ _rotation(rng.uniform(0, 2 * np.pi))
        rows.append([a[0, 0], a[0, 1], a[1, 0], a[1, 1], *rng.uniform(-1, 1, 2), 0.0])
    ifs = np.array(rows)
    det = np.abs(ifs[:, 0] * ifs[:, 3] - ifs[:, 1] * ifs[:, 2])
    p = det + 0.05 * det.sum() / n  # FractalDB's determinant-proportional choice, with a floor for thin maps
    ifs[:, 6] = p / p.sum()
    return ifs


def _fixed_points(ifs_batch: np.ndarray) -> np.ndarray:
    """Fixed point of every map, (B, M, 2): it lies on the attractor, so walkers started there need no burn-in."""
    a, b, c, d, e, f = (ifs_batch[..., j] for j in range(6))
    det = (1 - a) * (1 - d) - b * c  # det(I - A) > 0 for a contraction
    det = np.where(np.abs(det) < 1e-9, 1e-9, det)
    return np.stack([((1 - d) * e + b * f) / det, (c * e + (1 - a) * f) / det], axis=-1)


def _chaos(ifs_batch: np.ndarray, rng: np.random.Generator, walkers: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Run the chaos game for a batch of systems (B, M, 7) at once, walkers per system, steps per walker.

    Returns points (B, walkers * steps, 2) and, per point, a colour coordinate in [0, 1]: the running average of the
    indices of the maps applied (as in fractal flames), so that parts of the attractor get distinct colours.
    """
    b, m, _ = ifs_batch.shape
    par = ifs_batch.astype(np.float32)
    cum = np.cumsum(par[:, :, 6], axis=1)
    cum[:, -1] = 2.0  # absorb rounding, never pick padding maps
    bi = np.arange(b)[:, None]
    n_maps = (par[:, :, 6] > 0).sum(1)
    start = np.arange(walkers)[None, :] % np.maximum(n_maps, 1)[:, None]
    x = _fixed_points(par)[bi, start].astype(np.float32)  # (B, W, 2)
    col = start.astype(np.float32) / max(m - 1, 1)
    pts = np.empty((b, steps, walkers, 2), np.float32)
    cols = np.empty((b, steps, walkers), np.float32)
    for t in range(steps):
        k = (rng.random((b, walkers), dtype=np.float32)[..., None] >= cum[:, None, :]).sum(-1)  # (B, W) map index
        p = par[bi, k]  # (B, W, 7)
        x0, x1 = x[..., 0], x[..., 1]
        x = np.stack([p[..., 0] * x0 + p[..., 1] * x1 + p[..., 4], p[..., 2] * x0 + p[..., 3] * x1 + p[..., 5]], -1)
        col = 0.5 * (col + k.astype(np.float32) / max(m - 1, 1))
        pts[:, t], cols[:, t] = x, col
    return pts.reshape(b, -1, 2), cols.reshape(b, -1)


def _contract(ifs_batch: np.ndarray, limit: float = 0.99) -> np.ndarray:
    """Scale down any linear part whose spectral norm exceeds `limit`, so perturbed systems stay contractive."""
    a, b, c, d = (ifs_batch[..., j] for j in range(4))
    fro2 = a * a + b * b + c * c + d * d
    det = a * d - b * c
    sigma1 = np.sqrt(0.5 * (fro2 + np.sqrt(np.maximum(fro2 * fro2 - 4 * det * det, 0))))
    factor = np.minimum(1.0, limit / np.maximum(sigma1, 1e-12))
    out = ifs_batch.copy()
    out[..., :4] *= factor[..., None]
    return out


def filling_rate(ifs: np.ndarray, rng: np.random.Generator, grid: int = FILL_GRID, points: int = 20_000) -> float:
    """Share of a grid covered by the attractor, fitted into the grid with its aspect ratio kept."""
    walkers = 256
    pts, _ = _chaos(ifs[None], rng, walkers, points // walkers)
    pts = pts[0]
    if not np.isfinite(pts).all():
        return 0.0
    lo, hi = pts.min(0), pts.max(0)
    extent = float((hi - lo).max())
    if extent < 1e-6:
        return 0.0
    ij = np.minimum(((pts - lo) / extent * grid).astype(np.int64), grid - 1)
    return len(np.unique(ij[:, 0] * grid + ij[:, 1])) / grid**2


def sample_ifs(rng: np.random.Generator, threshold: float = FILL_THRESHOLD, max_tries: int = 1000) -> np.ndarray:
    """A random contractive IFS (M x 7 rows a, b, c, d, e, f, p) whose attractor passes the filling-rate check."""
    for _ in range(max_tries):
        ifs = _random_system(rng)
        if filling_rate(ifs, rng) >= threshold:
            return ifs
    raise RuntimeError(f"no IFS passed the filling-rate check ({threshold}) in {max_tries} tries")


def sample_classes(num_classes: int, seed: int) -> list[np.ndarray]:
    """The IFS of each class; class c depends only on (seed, c), so adding classes leaves earlier ones unchanged."""
    return [sample_ifs(np.random.default_rng(np.random.SeedSequence([seed, 0, c]))) for c in range(num_classes)]


def _hsv_colours(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random saturated colours (..., 3) in [0, 1]."""
    h = rng.uniform(0, 1, shape)
    s = rng.uniform(0.5, 1.0, shape)
    v = rng.uniform(0.7, 1.0, shape)
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6) % 6
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def render_batch(
    systems: Sequence[np.ndarray],
    rng: np.random.Generator,
    size: int,
    weight_range: tuple[float, float] = (0.8, 1.2),
    scale_range: tuple[float, float] = (0.6, 1.0),
    walkers: int = 128,
    steps: int = 48,
    supersample: int = 2,
) -> np.ndarray:
    """Render one image per system: uint8 (B, size, size, 3), fractal in colour on black.

    Per image: one parameter of one map is scaled by a weight drawn from weight_range (FractalDB's intra-class
    variation), the attractor is fitted into a random share (scale_range) of the frame at a random offset, flipped
    horizontally half of the time, and coloured along a random two-colour gradient indexed by the maps applied.
    """
    b, m = len(systems), max(len(s) for s in systems)
    ifs = np.zeros((b, m, 7))
    for i, s in enumerate(systems):  # pad with never-chosen maps (p = 0)
        ifs[i, : len(s)] = s
    which_map = (rng.random(b) * np.array([len(s) for s in systems])).astype(np.int64)
    which_par = rng.integers(0, 6, b)
    ifs[np.arange(b), which_map, which_par] *= rng.uniform(*weight_range, b)
    pts, cols = _chaos(_contract(ifs), rng, walkers, steps)

    # place: fit the bounding box (aspect kept) into a random share of the frame at a random offset
    big = size * supersample
    lo, hi = pts.min(axis=1), pts.max(axis=1)
    extent = np.maximum((hi - lo).max(axis=1), 1e-6)
    scale = (rng.uniform(*scale_range, b) * big / extent).astype(np.float32)
    span = (hi - lo) * scale[:, None]
    offset = (rng.uniform(0, 1, (b, 2)) * np.maximum(big - span, 0)).astype(np.float32)
    xy = (pts - lo[:, None, :]) * scale[:, None, None] + offset[:, None, :]
    flip = rng.random(b) < 0.5
    xy[flip, :, 0] = big - 1e-3 - xy[flip, :, 0]
    ij = np.floor(xy).astype(np.int64)
    keep = (ij >= 0).all(-1) & (ij < big).all(-1)

    # rasterise: per-pixel point count and mean colour coordinate
    flat = (np.arange(b)[:, None] * big * big + ij[..., 1] * big + ij[..., 0])[keep]
    count = np.bincount(flat, minlength=b * big * big).reshape(b, big, big)
    csum = np.bincount(flat, weights=cols[keep], minlength=b * big * big).reshape(b, big, big)
    coord = csum / np.maximum(count, 1)
    ends = _hsv_colours(rng, (b, 2))  # a gradient between two random colours
    rgb = ends[:, None, None, 0] * (1 - coord[..., None]) + ends[:, None, None, 1] * coord[..., None]
    density = np.minimum(1.0, np.log1p(count) / np.log1p(rng.uniform(2, 6, b))[:, None, None])
    img = rgb * density[..., None]
    img = img.reshape(b, size, supersample, size, supersample, 3).mean(axis=(2, 4))
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def render(ifs: np.ndarray, rng: np.random.Generator, size: int, **kwargs) -> np.ndarray:
    """One image (size, size, 3) uint8 of the system `ifs`; see render_batch for the variations applied."""
    return render_batch([ifs], rng, size, **kwargs)[0]


def render_dataset(
    systems: Sequence[np.ndarray], images_per_class: int, size: int, seed: int, stream: int = 1, chunk: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed set of images_per_class renders per class, class-interleaved: (N, size, size, 3) uint8, (N,) int64.

    Chunk j (of `chunk` images) is drawn from the random stream (seed, stream, j), so chunks can be rendered in any
    order; different `stream` values give independent image sets of the same classes (e.g. training and held-out).
    """
    labels = np.tile(np.arange(len(systems), dtype=np.int64), images_per_class)
    images = np.empty((len(labels), size, size, 3), np.uint8)
    for j, start in enumerate(range(0, len(labels), chunk)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, stream, j]))
        part = labels[start : start + chunk]
        images[start : start + len(part)] = render_batch([systems[c] for c in part], rng, size)
    return images, labels


class FractalDataset(Dataset):
    """Pre-rendered fractal images, optionally kept in a .npy file that is memory-mapped back.

    Rendering once and reading a memmap keeps training cheap on a small CPU and lets an interrupted run resume without
    re-rendering. Items are (float tensor 3xHxW in [0, 1], label).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    @classmethod
    def build(
        cls,
        num_classes: int,
        images_per_class: int,
        size: int,
        seed: int,
        stream: int = 1,
        cache: Path | None = None,
    ) -> FractalDataset:
        """Render (or reuse from `cache`, a .npy path) the images of classes sample_classes(num_classes, seed)."""
        recipe = {
            "num_classes": num_classes,
            "images_per_class": images_per_class,
            "size": size,
            "seed": seed,
            "stream": stream,
            "version": 1,
        }
        if cache is not None:
            cache = Path(cache)
            meta = cache.with_suffix(".json")
            if cache.is_file() and meta.is_file() and json.loads(meta.read_text()) == recipe:
                images = np.load(cache, mmap_mode="r")
                return cls(images, np.tile(np.arange(num_classes, dtype=np.int64), images_per_class))
        images, labels = render_dataset(sample_classes(num_classes, seed), images_per_class, size, seed, stream)
        if cache is not None:
            def save(path: Path) -> None:
                with open(path, "wb") as f:  # a handle, since np.save appends .npy to a bare name
                    np.save(f, images)

            atomic_write(cache, save)
            write_text(meta, json.dumps(recipe))
            images = np.load(cache, mmap_mode="r")
        return cls(images, labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1).float() / 255
        return img, int(self.labels[i])

    def batch(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Many items at once (B, 3, H, W) float in [0, 1] and (B,) labels, without per-item Python work."""
        img = torch.from_numpy(np.ascontiguousarray(self.images[index])).permute(0, 3, 1, 2).float() / 255
        return img, torch.from_numpy(self.labels[index])
