"""
The spectral geometry, in pictures
==================================

Every linear operator ``y = W x + b`` becomes a point on a unit hypersphere: the singular
values of its augmented matrix ``[[W, b], [0, 1]]``, scaled to unit length (its normalized
spectrum ``psi``). Two operators are compared by the angle between their points, the
Fubini-Study distance ``d_FS = arccos |<psi, phi>|``, and by the Wasserstein-2 distance
between their spectra as distributions. Inside one layer, each output channel is a point
too (its filter and bias), and the redundancy graph (QM-FRG) links channels that lie close.

This tutorial draws these objects for the digits ResNet that ships with the package, then
shows the limit of the picture: equal spectra do not mean equal functions, and the direct
check in the network's own basis is what decides.

Run it with ``python tutorials/04_spectral_geometry_explained.py``. Figures (PNG) go to
``tutorial_out/04_spectral_geometry_explained/`` (``TVM_QMFRG_TUTORIAL_OUT`` changes the root
folder). It takes seconds; ``TVM_QMFRG_TUTORIAL_QUICK=1`` changes nothing of substance.
"""

# %%
# Setup
# -----
# The geometry lives in the framework-free core: ``tvm_qmfrg.spectral`` (operators to
# points), ``tvm_qmfrg.metrics`` (distances and bounds) and ``tvm_qmfrg.graph`` (QM-FRG).
# TVM is used once, at the end, to run the models. Figures use matplotlib's file backend.

import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from tvm_qmfrg.apps.datasets import load_digits_splits  # noqa: E402
from tvm_qmfrg.graph import build_graph  # noqa: E402
from tvm_qmfrg.metrics import (  # noqa: E402
    best_scale,
    fubini_study,
    pairwise_fubini_study,
    pairwise_wasserstein2,
    spectral_gap,
    wasserstein2,
)
from tvm_qmfrg.onnxio.reader import default_model_path, linear_operators  # noqa: E402
from tvm_qmfrg.report import format_table  # noqa: E402
from tvm_qmfrg.spectral import pad_spectra  # noqa: E402

QUICK = os.environ.get("TVM_QMFRG_TUTORIAL_QUICK") == "1"
OUT = (
    Path(os.environ.get("TVM_QMFRG_TUTORIAL_OUT", "tutorial_out"))
    / "04_spectral_geometry_explained"
)
OUT.mkdir(parents=True, exist_ok=True)
DPI = 80 if QUICK else 120


def save(fig, name: str) -> Path:
    path = OUT / name
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return path


def short(name: str) -> str:
    """'/stages/stages.4/conv1/Conv' -> 's4.conv1'."""
    parts = [p for p in name.split("/") if p]
    if parts[0] == "stages":
        return f"s{parts[1].split('.')[-1]}.{parts[2]}"
    return parts[0]


# %%
# Operators as points on the sphere
# ---------------------------------
# ``linear_operators`` reads every Conv/Gemm with a constant weight from the ONNX file, with
# the following BatchNorm folded in (so the operator is what the network computes up to its
# nonlinearity). A conv kernel ``(O, I, kh, kw)`` is viewed as an ``O x (I kh kw)`` matrix.
# ``spectrum()`` is its point ``psi``: nonnegative, sorted, unit length.

model_path = default_model_path()
onnx_model = onnx.load(model_path)
ops = linear_operators(onnx_model)
spectra = [op.spectrum() for op in ops]
labels = [short(op.name) for op in ops]
print(f"{len(ops)} operators; spectrum lengths {sorted({len(s) for s in spectra})}")

chosen = [labels.index(n) for n in ("stem", "s0.conv1", "s2.conv1", "s4.conv2", "fc")]
fig, ax = plt.subplots(figsize=(7, 4))
for i in chosen:
    ax.plot(np.arange(1, len(spectra[i]) + 1), spectra[i], marker="o", ms=3, label=labels[i])
ax.set_xscale("log")
ax.set_xlabel("k")
ax.set_ylabel(r"$\psi_k = s_k / \|s\|$")
ax.set_title("Normalized spectra of five layers (each a unit vector)")
ax.legend()
save(fig, "spectra.png")

# %%
# Each curve is one point on a sphere of dimension up to 65. A flat curve (many comparable
# singular values) is a high-rank operator; a steep one concentrates its energy in a few
# directions. All points lie in the positive orthant, in one cap of the sphere. To *see*
# them, flatten that cap like a map of the pole: around the cap's centre (the normalized
# mean spectrum), each point is drawn at its exact angle from the centre, in the direction
# it leaves the centre (projected onto the two main such directions). Distances between
# points are only approximate in the picture; the numbers printed below are exact.

padded = pad_spectra(spectra)  # spectra of different length: zero-padded
center = padded.mean(axis=0)
center /= np.linalg.norm(center)
cosines = np.clip(padded @ center, -1.0, 1.0)
tangent = padded - cosines[:, None] * center
tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-12)
log_map = np.arccos(cosines)[:, None] * tangent  # length = angle from the centre
_, _, vt = np.linalg.svd(log_map, full_matrices=False)
xy = log_map @ vt[:2].T
xy *= (np.arccos(cosines) / np.maximum(np.linalg.norm(xy, axis=1), 1e-12))[:, None]

fig, ax = plt.subplots(figsize=(6.5, 6.5))
for radius in (0.2, 0.4, 0.6):
    ax.add_patch(plt.Circle((0, 0), radius, fill=False, color="0.8", linestyle="--"))
    ax.text(radius * 0.71, radius * 0.71, f"{radius} rad", color="0.5", fontsize=7)
points = ax.scatter(*xy.T, c=[len(s) for s in spectra], cmap="viridis", s=40, zorder=3)
for (px, py), name in zip(xy, labels):
    ax.annotate(name, (px, py), textcoords="offset points", xytext=(4, 3), fontsize=7)
ax.plot(0, 0, "k+", ms=10)
ax.set_aspect("equal")
limit = 1.1 * np.abs(xy).max()
ax.set_xlim(-limit, limit)
ax.set_ylim(-limit, limit)
fig.colorbar(points, ax=ax, shrink=0.7, label="spectrum length")
ax.set_title("The 16 operators on the sphere, seen from the centre of their cap")
save(fig, "sphere.png")

# %%
# Distances between operators
# ---------------------------
# ``pairwise_fubini_study`` is one matrix product over the padded spectra;
# ``pairwise_wasserstein2`` compares the spectra as distributions of values, so spectra of
# different lengths need no padding. The two views agree on the gross structure and differ
# in detail: FS weighs the large singular values, W2 the shape of the whole distribution.

fs = pairwise_fubini_study(padded)
w2 = pairwise_wasserstein2(spectra)
fig, axes = plt.subplots(1, 2, figsize=(12, 5))
for ax, matrix, title in ((axes[0], fs, "Fubini-Study (rad)"), (axes[1], w2, "Wasserstein-2")):
    image = ax.imshow(matrix, cmap="magma_r")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
save(fig, "distances.png")

rows = []
for a in chosen:
    for b in chosen:
        if a < b:
            rows.append(
                [
                    labels[a],
                    labels[b],
                    fubini_study(spectra[a], spectra[b]),
                    wasserstein2(spectra[a], spectra[b]),
                ]
            )
print(format_table(["operator", "operator", "d_FS rad", "W2"], rows))
off = fs + np.diag(np.full(len(ops), np.inf))
i, j = np.unravel_index(np.argmin(off), off.shape)
print(f"closest pair on the sphere: {labels[i]} and {labels[j]}, d_FS = {fs[i, j]:.4f} rad")

# %%
# The QM-FRG of one layer
# -----------------------
# Inside a layer each output channel ``j`` is the vector ``[w_j ; b_j]`` (its filter and bias,
# BatchNorm folded). The pairwise FS distances between these channel states are what the
# pruning criterion reads: merging channel ``j`` into channel ``i`` costs at most
# ``||V[:, j]|| * ||w_j|| * sin(theta_ij)`` at the consumer ``V``, and dropping it outright is
# the ``sin = 1`` case (magnitude pruning). ``build_graph`` keeps the edges within
# ``epsilon`` and each channel's ``k`` nearest neighbours; its clusters are the groups of
# mutually substitutable channels. Ordering channels by cluster makes the structure visible.

layer = ops[labels.index("s4.conv1")]
states = layer.channel_states()
d = pairwise_fubini_study(states)
graph = build_graph(states, epsilon=0.05, k=2)
clusters = graph.clusters(n_clusters=8)
order = np.lexsort((np.arange(len(clusters)), clusters))
nearest, angle = graph.nearest()
close = int(np.sum(d[np.triu_indices(len(d), 1)] <= 0.05))
print(
    f"{layer.name}: {states.shape[0]} channels of dimension {states.shape[1]}; "
    f"{close} pair(s) within 0.05 rad; nearest-neighbour angle median {np.median(angle):.3f} "
    f"rad (min {angle.min():.3f}): the bound of a merge is typically "
    f"{1 - np.median(np.sin(angle)):.0%} below that of dropping the channel"
)

fig, axes = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1.2, 1]})
image = axes[0].imshow(d[np.ix_(order, order)], cmap="magma_r", vmin=0, vmax=np.pi / 2)
fig.colorbar(image, ax=axes[0], shrink=0.8, label="d_FS (rad)")
axes[0].set_title(f"{short(layer.name)}: FS distance between channels (ordered by cluster)")
axes[1].hist(angle, bins=20, color="tab:blue")
axes[1].axvline(0.05, color="tab:red", linestyle="--", label="epsilon = 0.05")
axes[1].set_xlabel("angle to the nearest other channel (rad)")
axes[1].set_ylabel("channels")
axes[1].set_title("How redundant are the channels?")
axes[1].legend()
save(fig, "qmfrg_layer.png")

# %%
# This model was trained to 99.7% on a small data set and its channels are far apart: no
# exact duplicates, so lossless merging (``epsilon`` mode) finds nothing here, and pruning
# removes real information. That is the regime where the data-aware refit of tutorial 01
# earns its keep.

# %%
# The rotated twin: equal spectra, different functions
# ----------------------------------------------------
# Singular values do not change under rotations: ``W`` and ``U W`` (``U`` orthogonal) have the
# same spectrum. Take the classifier layer ``fc`` and build a *twin* model whose ``fc`` is
# ``U W`` with bias ``U b`` (the augmented matrix is rotated by ``diag(U, 1)``, so its spectrum
# is unchanged too). On the sphere the twin's ``fc`` sits exactly on top of the original;
# Mirsky's inequality ``||s(W) - s(U W)|| <= ||W - U W||_F`` holds with a zero on the left and
# a large number on the right.

fc = ops[labels.index("fc")]
rng = np.random.default_rng(0)
rotation, _ = np.linalg.qr(rng.standard_normal((fc.out_channels, fc.out_channels)))
twin_w, twin_b = rotation @ fc.weight, rotation @ fc.bias
w_aug = np.concatenate([fc.weight, fc.bias[:, None]], axis=1)
twin_aug = np.concatenate([twin_w, twin_b[:, None]], axis=1)


def twin_model(weight: np.ndarray, bias: np.ndarray, name: str) -> Path:
    """The shipped model with fc's Gemm weight and bias replaced (Gemm here: transB=1)."""
    model = onnx.load(model_path)
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    for init in model.graph.initializer:
        if init.name == gemm.input[1]:
            value = weight if attrs.get("transB", 0) else weight.T
            init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
        elif init.name == gemm.input[2]:
            init.CopyFrom(numpy_helper.from_array(bias.astype(np.float32), init.name))
    path = OUT / name
    onnx.save(model, path)
    return path


rotated_path = twin_model(twin_w, twin_b, "digits_rotated_twin.onnx")
scaled_path = twin_model(2.0 * fc.weight, 2.0 * fc.bias, "digits_scaled_twin.onnx")
rotated_fc = linear_operators(onnx.load(rotated_path))[-1]
scaled_fc = linear_operators(onnx.load(scaled_path))[-1]
print(
    f"fc vs rotated twin: d_FS = {fubini_study(fc.spectrum(), rotated_fc.spectrum()):.2e} rad, "
    f"W2 = {wasserstein2(fc.spectrum(), rotated_fc.spectrum()):.2e}, "
    f"||s(W) - s(UW)|| = {spectral_gap(fc.weight, rotated_fc.weight):.2e}, "
    f"||W - UW||_F = {np.linalg.norm(fc.weight - rotated_fc.weight):.3f}"
)

# %%
# The direct check
# ----------------
# Spectral closeness is necessary for two operators to be interchangeable, never
# sufficient. What decides is the check in the network's own basis: find the best scale
# ``c`` and accept only if ``||W_b - c W_a||_F <= delta ||W_b||_F`` (with the bias as an
# extra column). ``metrics.best_scale`` returns ``c`` and the relative residual. A scaled
# copy ``2 W`` passes (its spectrum differs slightly from the original's because of the
# fixed ``1`` in the augmented matrix, but the check finds ``c = 2`` exactly); the rotated
# twin fails.

DELTA = 1e-3
rows = []
for name, other in (("scaled twin 2 W", scaled_fc), ("rotated twin U W", rotated_fc)):
    other_aug = np.concatenate([other.weight, other.bias[:, None]], axis=1)
    c, residual = best_scale(w_aug, other_aug)
    rows.append(
        [
            name,
            fubini_study(fc.spectrum(), other.spectrum()),
            c,
            residual,
            "equivalent" if residual <= DELTA else "differs",
        ]
    )
print(format_table(["fc vs", "d_FS rad", "best c", "residual", f"delta={DELTA}"], rows))

# %%
# And the functions: run the original and both twins with TVM on the test split. The scaled
# twin multiplies the logits by 2 and predicts the same digits; the rotated twin mixes the
# ten logits and its predictions have little to do with the original's.

import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402

data = load_digits_splits(seed=0)


def accuracy(path) -> float:
    mod = from_onnx(onnx.load(path), keep_params_in_input=False)
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target("llvm")), tvm.cpu())
    logits = vm["main"](tvm.runtime.tensor(data.x_test)).numpy()
    return float(np.mean(logits.argmax(axis=1) == data.y_test))


scores = {
    "original": accuracy(model_path),
    "scaled twin": accuracy(scaled_path),
    "rotated twin": accuracy(rotated_path),
}
for name, score in scores.items():
    print(f"test accuracy, {name}: {score:.4f}")

fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), gridspec_kw={"width_ratios": [1, 1, 1, 0.8]})
k = np.arange(1, len(fc.spectrum()) + 1)
axes[0].plot(k, fc.spectrum(), "o-", label="fc")
axes[0].plot(k, rotated_fc.spectrum(), "x--", label="rotated twin")
axes[0].set_title("identical spectra")
axes[0].set_xlabel("k")
axes[0].legend()
limit = np.abs(w_aug).max()
for ax, matrix, title in ((axes[1], w_aug, "[W | b]"), (axes[2], twin_aug, "[UW | Ub]")):
    ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_title(f"{title}: different weights")
    ax.set_xlabel("input feature")
bars = ["original", "2 W", "U W"]
axes[3].bar(bars, list(scores.values()), color=["tab:green", "tab:blue", "tab:red"])
for position, score in enumerate(scores.values()):
    axes[3].text(position, score + 0.02, f"{score:.2f}", ha="center", fontsize=8)
axes[3].set_ylim(0, 1.1)
axes[3].set_title("test accuracy (fc replaced)")
save(fig, "rotated_twin.png")

# %%
# The command line does the same comparison for any two models: every operator pair, closest
# first on the sphere, with the verdict of the direct check. Here only the ``fc`` pair is
# of interest (the other fifteen layers are unchanged, so they are trivially equivalent):

command = ["tvm-qmfrg", "compare", model_path, str(rotated_path), "--top", "16"]
print("$", " ".join(command))
proc = subprocess.run(
    [sys.executable, "-m", "tvm_qmfrg.cli", *command[1:]], capture_output=True, text=True
)
if proc.returncode != 0:
    sys.exit(f"tvm-qmfrg compare failed: {proc.stderr.strip()}")
lines = proc.stdout.splitlines()
print("\n".join(lines[:2] + [line for line in lines if "/fc/" in line]))

# %%
# This is why ``SpectralSubstitution`` and ``tvm-qmfrg compare`` screen with the spectra
# (cheap, and far spectra *prove* two operators differ) and then decide with the direct
# check: an FS distance of zero is an invitation to look, not a licence to substitute.
