"""
Put the pruning pass into a TVM build
=====================================

``QMFRGPrune`` and ``SpectralSubstitution`` are ordinary ``tvm.transform.Pass`` objects. This
tutorial imports the digits ResNet that ships with the package through TVM's own ONNX
frontend, places the two passes in a ``tvm.transform.Sequential`` next to TVM's passes,
compiles with ``tvm.compile``, runs on ``relax.VirtualMachine`` and compares the pruned build
with the dense one: test accuracy, FLOPs, parameters and latency.

It then shows the *data-aware* mode (``calibration=`` a few hundred training images), which
refits the layers after each pruned group by least squares. On this small model that refit
is what keeps accuracy usable once a third of the FLOPs is gone; the tables below show how
much.

Run it with ``python tutorials/01_insert_pass_in_tvm_build.py``. Outputs go to
``tutorial_out/01_insert_pass_in_tvm_build/`` (set ``TVM_QMFRG_TUTORIAL_OUT`` to change the
root folder); ``TVM_QMFRG_TUTORIAL_QUICK=1`` shrinks the run for CI.
"""

# %%
# Setup
# -----
# Everything here uses the public API: ``tvm_qmfrg.passes`` for the passes,
# ``tvm_qmfrg.targets`` for the host target, and the framework-free core for the model path,
# the data set and the ONNX node names.

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import tvm
import tvm_qmfrg.targets
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx
from tvm_qmfrg.passes import QMFRGPrune, SpectralSubstitution

from tvm_qmfrg.apps.datasets import load_digits_splits
from tvm_qmfrg.onnxio.reader import default_model_path, operator_names
from tvm_qmfrg.plan import PruningPlan
from tvm_qmfrg.report import format_table

QUICK = os.environ.get("TVM_QMFRG_TUTORIAL_QUICK") == "1"
OUT = Path(os.environ.get("TVM_QMFRG_TUTORIAL_OUT", "tutorial_out")) / "01_insert_pass_in_tvm_build"
OUT.mkdir(parents=True, exist_ok=True)

# FLOPs reductions to try, calibration images for the data-aware mode, timing repeats.
REDUCTIONS = [0.3] if QUICK else [0.3, 0.4]
CALIBRATION_IMAGES = 128 if QUICK else 256
REPEAT = 3 if QUICK else 10

# %%
# Import the model with TVM's ONNX frontend
# -----------------------------------------
# ``keep_params_in_input=False`` turns the weights into constants, which is what the pruning
# pass rewrites. The model's batch dimension is symbolic (``batch``): one import serves both
# the accuracy run (the whole test split in one call) and the latency run. Only the batch may
# be symbolic; the pass needs every other dimension to count FLOPs and resize reshapes.

model_path = default_model_path()
onnx_model = onnx.load(model_path)
mod = from_onnx(onnx_model, keep_params_in_input=False)

# ONNX node names of the Conv/Gemm operators, in graph order: the plan will use them.
names = operator_names(onnx_model)
print(f"model: {model_path}")
print(f"{len(names)} conv/dense operators, first {names[0]}, last {names[-1]}")

# %%
# Data: the digits test split, and training images for calibration
# -----------------------------------------------------------------
# ``load_digits_splits`` gives the same stratified 60/20/20 split the model was trained on.
# Accuracy is measured on the test split only; the data-aware mode sees training images only.

data = load_digits_splits(seed=0)
calibration = data.x_train[:CALIBRATION_IMAGES]
print(f"test images {data.x_test.shape}, calibration images {calibration.shape}")

# %%
# A target and a way to measure a build
# -------------------------------------
# The shipped ``x86-host`` target config detects this machine's CPU (``mcpu``) when it is
# loaded; ``tvm_target()`` gives the ``tvm.target.Target``. Everything is built untuned here:
# latencies compare like with like, but they are not what a tuned build reaches (tutorial 02
# tunes with MetaSchedule).

target = tvm_qmfrg.targets.load("x86-host").tvm_target()
dev = tvm.cpu()


def measure(module: tvm.IRModule) -> dict:
    """Compile ``module``, then its test accuracy and batch-1 latency (median, ms)."""
    vm = relax.VirtualMachine(tvm.compile(module, target=target), dev)
    logits = vm["main"](tvm.runtime.tensor(data.x_test)).numpy()
    accuracy = float(np.mean(logits.argmax(axis=1) == data.y_test))
    one = tvm.runtime.tensor(data.x_test[:1])
    timer = vm.time_evaluator("main", dev, number=20, repeat=REPEAT)
    latency_ms = float(np.median(timer(one).results) * 1e3)
    return {"accuracy": accuracy, "latency_ms": latency_ms}


# %%
# The dense build
# ---------------
# TVM's own passes only. ``FoldConstant`` and ``DeadCodeElimination`` are the passes the
# pruning pipeline below also ends with, so both builds go through the same steps.

dense_pipeline = tvm.transform.Sequential(
    [relax.transform.FoldConstant(), relax.transform.DeadCodeElimination()]
)
dense = measure(dense_pipeline(mod))
print(f"dense: test accuracy {dense['accuracy']:.4f}, latency {dense['latency_ms']:.3f} ms")

# %%
# The passes in a Sequential
# --------------------------
# ``QMFRGPrune(flops_reduction=0.3)`` removes 30% of the conv/dense FLOPs. It merges each
# removed channel into its nearest kept channel by Fubini-Study angle and folds the merge
# into the consumer; data-free, it also folds the mean a removed channel contributed (from
# the BatchNorm statistics) into the consumer's bias. Shapes really shrink: the pruned
# module has smaller convolutions, not masked ones.
#
# ``SpectralSubstitution(epsilon=0.05)`` then replaces an operator by a low-rank
# factorization, or computes duplicated ones once, only where the replacement is certified
# within ``epsilon`` radians (relative Frobenius error ``sin(epsilon)``, about 5%).
#
# The pass objects keep what they decided: ``prune.plan`` and ``sub.report``.


def pipeline(prune: QMFRGPrune, sub: SpectralSubstitution) -> tvm.transform.Pass:
    return tvm.transform.Sequential(
        [
            prune,
            sub,
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination(),
        ]
    )


results = {}  # (FLOPs reduction, mode) -> plan, module and measurements


def prune_and_measure(reduction: float, mode: str):
    """Run the pipeline at ``reduction`` data-free or data-aware; measure and remember it."""
    prune = QMFRGPrune(
        flops_reduction=reduction,
        names=names,
        calibration=calibration if mode == "data-aware" else None,
    )
    sub = SpectralSubstitution(epsilon=0.05, names=names)
    start = time.perf_counter()
    module = pipeline(prune, sub)(mod)
    seconds = time.perf_counter() - start
    results[reduction, mode] = dict(
        plan=prune.plan, report=sub.report, module=module, seconds=seconds, **measure(module)
    )
    return results[reduction, mode]


free = prune_and_measure(REDUCTIONS[0], "data-free")
print(free["plan"].table())

# %%
# The table lists each channel group (named after its first producer; residual connections
# couple several producers into one group), the channels kept and how many were merged
# rather than dropped, then FLOPs and parameters counted on the rewritten module. The fully
# connected layer is frozen: its channels are the model's output.
#
# The substitution report lists every replaced operator with its certified bounds. This
# trained model's layers are close to full rank, so at a 0.05 rad angle expect few or no
# certified substitutions: the pass does nothing rather than something uncertified.

print(free["report"].table())

print(
    f"data-free, {free['plan'].flops_reduction:.1%} fewer FLOPs: test accuracy "
    f"{free['accuracy']:.4f} (dense {dense['accuracy']:.4f}), "
    f"latency {free['latency_ms']:.3f} ms (dense {dense['latency_ms']:.3f} ms)"
)

# %%
# Data-aware mode
# ---------------
# With ``calibration=`` the pass runs the model on those inputs and, group by group on the
# network already pruned upstream, keeps the channels whose loss the group's consumers can
# best make up for, then refits the consumers by least squares: every feature the consumer
# read in the dense model is predicted from the kept ones (``x ~= R x_kept + mu``), and ``R``
# and ``mu`` are folded into the consumer weights and bias. Compare the two accuracies.

aware = prune_and_measure(REDUCTIONS[0], "data-aware")
print(
    f"data-aware, {aware['plan'].flops_reduction:.1%} fewer FLOPs: test accuracy "
    f"{aware['accuracy']:.4f} (data-free {free['accuracy']:.4f})"
)

# %%
# Plans are files
# ---------------
# A plan saved as JSON reproduces the same module later, without re-deciding (and without
# the calibration data): ``QMFRGPrune(plan=...)`` applies it. This is how a plan chosen once
# is reused for a differently shaped import, e.g. a static batch-1 model for deployment.

plan_path = OUT / "plan_data_aware.json"
aware["plan"].save(plan_path)
replay = QMFRGPrune(plan=PruningPlan.load(plan_path), names=names)
static_one = from_onnx(onnx_model, shape_dict={"input": [1, 1, 8, 8]}, keep_params_in_input=False)
replayed = tvm.transform.Sequential([replay, relax.transform.FoldConstant()])(static_one)
vm = relax.VirtualMachine(tvm.compile(replayed, target=target), dev)
expected = relax.VirtualMachine(tvm.compile(aware["module"], target=target), dev)
x = tvm.runtime.tensor(data.x_test[:1])
gap = np.max(np.abs(vm["main"](x).numpy() - expected["main"](x).numpy()))
print(f"wrote {plan_path}; the replayed batch-1 module matches (max abs difference {gap:.2e})")

# %%
# How far can it go?
# ------------------
# Both modes at each FLOPs reduction. Expect the data-aware rows to hold up much longer than
# the data-free ones, and both to fall as the reduction grows: a 176k-parameter model
# trained to 99.7% has little slack. Latencies are untuned and measured on a shared machine,
# so read them as a trend.

rows = [["dense", "0.0%", dense["accuracy"], "-", dense["latency_ms"]]]
for reduction in REDUCTIONS:
    for mode in ("data-free", "data-aware"):
        r = results.get((reduction, mode)) or prune_and_measure(reduction, mode)
        rows.append(
            [mode, f"{r['plan'].flops_reduction:.1%}", r["accuracy"], r["seconds"], r["latency_ms"]]
        )
print(format_table(["build", "FLOPs -", "test acc", "passes s", "latency ms"], rows))

# %%
# A looser substitution angle
# ---------------------------
# ``epsilon`` is the certified error per operator: a larger angle buys fewer FLOPs with a
# larger error bound. On top of the data-aware pruned model, 0.3 rad lets the pass factor
# some convolutions (each certified within ``sin(0.3)``, about 30% relative Frobenius error);
# the accuracy below says whether that error is affordable here.

loose = SpectralSubstitution(epsilon=0.3, kinds=("lowrank",), names=names)
substituted = tvm.transform.Sequential([loose, relax.transform.FoldConstant()])(aware["module"])
print(loose.report.table())
result = measure(substituted)
print(
    f"data-aware pruned + lowrank(0.3): test accuracy {result['accuracy']:.4f} "
    f"(without substitution {aware['accuracy']:.4f})"
)

# %%
# The same from the command line
# ------------------------------
# ``tvm-qmfrg prune`` runs the same pass (data-free) and prints the same table; ``--plan``
# saves the plan and ``-o`` writes the pruned model as ONNX, which runs in any ONNX runtime.

command = [
    "tvm-qmfrg", "prune", model_path, "--flops-reduction", "0.3",
    "--plan", str(OUT / "plan_cli.json"), "-o", str(OUT / "digits_pruned.onnx"),
]  # fmt: skip
print("$", " ".join(command))
# run as ``python -m tvm_qmfrg.cli``: the same program, from this Python environment
proc = subprocess.run(
    [sys.executable, "-m", "tvm_qmfrg.cli", *command[1:]], capture_output=True, text=True
)
if proc.returncode != 0:
    sys.exit(f"tvm-qmfrg prune failed: {proc.stderr.strip()}")
print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(("FLOPs", "wrote"))))

# %%
# Next: tutorial 02 prunes for an ARM board, tunes with MetaSchedule and cross-compiles.
