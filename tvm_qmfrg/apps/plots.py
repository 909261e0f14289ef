"""PNG figures of the evaluation report (matplotlib, Agg backend: no display needed).

- :func:`quality_vs_flops`: accuracy (digits, test and augmented) and embedding fidelity
  (MiniLM, mean cosine) against the achieved FLOPs reduction, one line per criterion.
- :func:`redundancy_figures`: the normalized spectra ``psi`` of the most and the least
  redundant layer of a model, and the heat map of the most redundant layer's QM-FRG
  distances (Fubini–Study angles between its channel states, clustered order).

A layer's redundancy is the median, over its channels, of the FS angle to the nearest other
channel of the layer: small means many channels have a near-parallel partner to merge into.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tvm_qmfrg.metrics import pairwise_fubini_study
from tvm_qmfrg.operators import LinearOperator

MIN_CHANNELS = 8  # layers narrower than this say little about redundancy


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(cells, metric: str, mode: str | None = None) -> dict[str, tuple[list, list]]:
    """criterion -> (achieved FLOPs reductions, metric), averaged over seeds per target."""
    by = defaultdict(list)
    for c in cells:
        if c.criterion == "dense" or (mode is not None and c.mode != mode):
            continue
        by[(c.criterion, c.target)].append(c)
    curves: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for (crit, _), group in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        xs, ys = curves[crit]
        xs.append(100 * float(np.mean([c.flops_reduction for c in group])))
        ys.append(float(np.mean([getattr(c, metric) for c in group])))
    return dict(curves)


def quality_vs_flops(digits_cells: Sequence, minilm_cells: Sequence, path: str) -> None:
    """One panel per metric present: digits test / augmented accuracy, MiniLM cosine."""
    panels = []
    if digits_cells:
        panels += [
            (_curves(digits_cells, "test_accuracy"), "digits ResNet: test accuracy"),
            (_curves(digits_cells, "augmented_accuracy"), "digits ResNet: augmented accuracy"),
        ]
    if minilm_cells:
        panels.append(
            (_curves(minilm_cells, "mean_cosine", "flops"), "MiniLM: cosine to dense embedding")
        )
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (curves, title) in zip(axes[0], panels):
        for crit, (xs, ys) in sorted(curves.items()):
            ax.plot(xs, ys, marker="o", label=crit, linestyle="--" if "+cal" in crit else "-")
        ax.set_title(title)
        ax.set_xlabel("FLOPs reduction (%)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy / fidelity")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class LayerRedundancy:
    name: str
    channels: int
    median_nearest_angle: float


def layer_redundancy(op: LinearOperator) -> tuple[LayerRedundancy, np.ndarray]:
    """The layer's redundancy and its pairwise FS matrix between channel states."""
    d = pairwise_fubini_study(op.channel_states())
    np.fill_diagonal(d, np.inf)
    nearest = float(np.median(d.min(axis=1)))
    np.fill_diagonal(d, 0.0)
    return LayerRedundancy(op.name, op.out_channels, nearest), d


def redundancy_figures(
    operators: Sequence[LinearOperator], spectra_path: str, heatmap_path: str
) -> tuple[LayerRedundancy, LayerRedundancy]:
    """Write both figures; return (most, least) redundant layer."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    wide = [op for op in operators if op.groups == 1 and op.out_channels >= MIN_CHANNELS]
    if len(wide) < 2:
        raise ValueError("redundancy figures need two layers with >= 8 channels")
    scored = [(layer_redundancy(op), op) for op in wide]
    scored.sort(key=lambda s: s[0][0].median_nearest_angle)
    (most, d_most), op_most = scored[0]
    (least, _), op_least = scored[-1]

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for info, op in ((most, op_most), (least, op_least)):
        psi = op.spectrum()
        ax.plot(
            np.arange(1, psi.size + 1),
            psi,
            marker=".",
            label=f"{info.name}: median nearest angle {info.median_nearest_angle:.2f} rad",
        )
    ax.set_xlabel("singular value index")
    ax.set_ylabel("normalized singular value (psi)")
    ax.set_title("spectra on the unit sphere: most vs least redundant layer")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(spectra_path, dpi=110)
    plt.close(fig)

    order = leaves_list(linkage(squareform(d_most, checks=False), method="single"))
    fig, ax = plt.subplots(figsize=(5.4, 4.6))
    im = ax.imshow(d_most[np.ix_(order, order)], cmap="viridis", vmin=0, vmax=np.pi / 2)
    fig.colorbar(im, ax=ax, label="Fubini–Study angle (rad)")
    ax.set_title(f"QM-FRG distances of {most.name} ({most.channels} channels)")
    ax.set_xlabel("channel (clustered order)")
    ax.set_ylabel("channel (clustered order)")
    fig.tight_layout()
    fig.savefig(heatmap_path, dpi=110)
    plt.close(fig)
    return most, least


def figure_names(folder: str) -> dict[str, str]:
    return {
        "quality": os.path.join(folder, "quality_vs_flops.png"),
        "spectra": os.path.join(folder, "spectra_most_least_redundant.png"),
        "heatmap": os.path.join(folder, "qmfrg_heatmap.png"),
    }
