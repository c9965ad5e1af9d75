"""The papers' figures of trained models: t-SNE of the features a head reads (SynQT paper, Fig. 5) and SynQT's
per-sample feature weights (Fig. 7). Plots are matplotlib PNGs; t-SNE is scikit-learn's."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data import ImageDataset, Listing
from ..data.batches import ImageBatches
from ..io import atomic_write
from ..methods.base import inputs_of
from ..tuned import TunedModel


@torch.no_grad()
def head_inputs(model: TunedModel, listing: Listing, batch_size: int = 64, limit: int = 500
                ) -> dict[str, np.ndarray]:
    """On the first ``limit`` images of ``listing``: the backbone's own pooled feature ("pooled"), what the
    method's classifier reads ("head"), the labels, and for SynQT the conditional head's feature weights
    ("weights", (N, F) with F = 3L + 1, H_L first)."""
    listing = Listing(listing.root, listing.samples[:limit], listing.classes, listing.source)
    images = ImageBatches(ImageDataset(listing, model.backbone.preprocessing.transform()))
    model.eval()
    head = getattr(model.method, "head", None)
    pooled, labels = [], []
    with contextlib.ExitStack() as hooks:
        got = hooks.enter_context(inputs_of(model.method.classifier()))
        # SynQT's conditional head: its per-sample feature weights
        weights = hooks.enter_context(inputs_of(head, lambda x: head.mix(x)[1])) if hasattr(head, "mix") else []
        for x, y in images.iterate(list(range(len(listing.samples))), batch_size, torch.device("cpu")):
            taps = model.trace(x)
            model.forward_taps(taps)
            pooled.append(taps.pooled)
            labels.append(y)
    out = {"pooled": torch.cat(pooled).numpy(), "head": torch.cat(got).numpy(), "labels": torch.cat(labels).numpy()}
    if weights:
        out["weights"] = torch.cat(weights).numpy()
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tsne(path: Path, panels: dict[str, np.ndarray], labels: np.ndarray, title: str) -> Path:
    """One t-SNE panel per feature set (e.g. the pre-trained pooled feature, VQT's, SynQT's), coloured by class."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), dpi=150, squeeze=False)
    for ax, (name, feats) in zip(axes[0], panels.items()):
        xy = TSNE(n_components=2, init="pca", random_state=0,
                  perplexity=float(min(30, len(feats) - 1))).fit_transform(feats.astype(np.float32))
        ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab20", s=6, linewidths=0)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("t-SNE 1", fontsize=8)
        ax.set_ylabel("t-SNE 2", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def plot_feature_weights(path: Path, weights: np.ndarray, title: str, samples: int = 50, seed: int = 0) -> Path:
    """|weight| of each of the 3L conditional features (H_i, then attention A_i, then FFN M_i, by block) for
    ``samples`` random samples, one colour per sample, as the SynQT paper's Fig. 7."""
    plt = _pyplot()
    w = np.abs(weights[:, 1:])  # H_L's weight is 1 by construction
    depth = w.shape[1] // 3
    pick = np.random.default_rng(seed).permutation(len(w))[:samples]
    fig, ax = plt.subplots(figsize=(7.5, 3.4), dpi=150)
    colours = plt.get_cmap("viridis")(np.linspace(0, 1, len(pick)))
    x = np.arange(w.shape[1])
    for c, i in zip(colours, pick):
        ax.scatter(x, w[i], s=7, color=c, alpha=0.7, linewidths=0)
    for g in (depth, 2 * depth):
        ax.axvline(g - 0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks([depth / 2 - 0.5, 1.5 * depth - 0.5, 2.5 * depth - 0.5],
                  ["block outputs $H_i$", "attention $A_i$", "FFN $M_i$"], fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("|feature weight|")
    ax.set_xlabel(f"feature (block 1..{depth} within each group)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def task_figures(out: Path, task: str, models: Sequence[tuple[str, TunedModel]], listing: Listing) -> list[Path]:
    """Fig. 5 (t-SNE: the pre-trained pooled feature, then each model's head input) and, for SynQT, Fig. 7."""
    feats = {name: head_inputs(model, listing) for name, model in models}
    if not feats:
        return []
    first = next(iter(feats.values()))
    panels = {"pre-trained (pooled)": first["pooled"], **{name: f["head"] for name, f in feats.items()}}
    paths = [plot_tsne(out / f"tsne-{task}.png", panels, first["labels"], f"t-SNE of head inputs: {task}")]
    for name, f in feats.items():
        if "weights" in f:
            paths.append(plot_feature_weights(out / f"feature-weights-{task}-{name}.png", f["weights"],
                                              f"{name} conditional head on {task}: |weight| per feature, "
                                              f"{min(50, len(f['weights']))} samples"))
    return paths
