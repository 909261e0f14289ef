"""
Prune, tune and cross-compile for an edge board
===============================================

A deployment target is one TOML file: the TVM target, the compiler that links the library,
the channel multiple the pruning pass rounds to on that hardware, tuning defaults and the
RPC key the board registers under. This tutorial takes the shipped ``arm-rk3399`` config
(Rockchip RK3399, 64-bit ARM with NEON), prunes the digits ResNet with that target's channel
rounding, shows MetaSchedule tuning on a demo budget, exports an AArch64 shared library with
the cross compiler, and finally adds a board of your own as a new TOML file.

Run it with ``python tutorials/02_cross_compile_for_an_edge_board.py``; it needs the AArch64
cross compiler (Debian/Ubuntu: ``apt-get install g++-aarch64-linux-gnu``). Outputs go to
``tutorial_out/02_cross_compile_for_an_edge_board/`` (``TVM_QMFRG_TUTORIAL_OUT`` changes the
root folder); ``TVM_QMFRG_TUTORIAL_QUICK=1`` skips the tuning demo for CI.
"""

# %%
# Setup
# -----

import logging
import os
import struct
import time
from pathlib import Path

import numpy as np
import onnx
import tvm
import tvm_qmfrg.targets
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx
from tvm_qmfrg.passes import QMFRGPrune

from tvm_qmfrg import OptionError
from tvm_qmfrg.apps.datasets import load_digits_splits
from tvm_qmfrg.onnxio.reader import default_model_path, operator_names

QUICK = os.environ.get("TVM_QMFRG_TUTORIAL_QUICK") == "1"
OUT = (
    Path(os.environ.get("TVM_QMFRG_TUTORIAL_OUT", "tutorial_out"))
    / "02_cross_compile_for_an_edge_board"
)
OUT.mkdir(parents=True, exist_ok=True)

# The tuning demo budget: a handful of trials, nowhere near a real budget (see below).
DEMO_TRIALS = 0 if QUICK else 12
DEMO_TRIALS_PER_TASK = 4

# MetaSchedule logs every candidate; its per-task logs still go to the work folder.
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)

# %%
# The target config
# -----------------
# ``tvm_qmfrg.targets.load`` takes a shipped name (``tvm_qmfrg.targets.available()`` lists
# them) or the path of a ``.toml`` file, validates every key, and returns a frozen
# ``TargetConfig``. ``tvm_target()`` is the ``tvm.target.Target`` it compiles for.

print("shipped targets:", ", ".join(tvm_qmfrg.targets.available()))
board = tvm_qmfrg.targets.load("arm-rk3399")
print(f"{board.name}: {board.description}")
target = board.tvm_target()
print(f"  [target]        {dict(board.target)}")
mattr = list(target.attrs["mattr"])
print(f"  TVM target      {target.kind.name}, {target.attrs['mtriple']}, {mattr}")
print(f"  round_to        {board.round_to} (channel multiple for the pruning pass)")
print(f"  cross compiler  {board.cross_compiler}, artifact .{board.format}")
print(f"  tuning default  {board.tuning.trials} trials, {board.tuning.trials_per_task} per task")
print(f"  runner          {board.runner.kind}, tracker key '{board.runner.key}'")

# %%
# Prune with the target's channel rounding
# ----------------------------------------
# NEON registers hold four fp32 lanes, so the RK3399 config asks for channel counts that are
# multiples of 4: ``round_to=board.round_to``. A deployment build has a fixed batch size, so
# the model is imported with a static shape. The pruning is data-aware (tutorial 01 shows
# why): 256 training images refit the layers after each pruned group.

onnx_model = onnx.load(default_model_path())
names = operator_names(onnx_model)
mod = from_onnx(onnx_model, shape_dict={"input": [1, 1, 8, 8]}, keep_params_in_input=False)
data = load_digits_splits(seed=0)

prune = QMFRGPrune(
    flops_reduction=0.3,
    round_to=board.round_to,
    names=names,
    calibration=data.x_train[: 128 if QUICK else 256],
)
pruned = prune(mod)
print(prune.plan.table())
kept = [g.kept_channels for g in prune.plan.groups]
print(
    f"every kept channel count is a multiple of {board.round_to}:",
    all(k % board.round_to == 0 for k in kept),
)

# %%
# Before shipping anything, check on this machine that the pruned model still classifies:
# build it for the host (untuned, only to run it) and score the test split one image at a
# time, exactly the shape the board will see.

host = tvm_qmfrg.targets.load("x86-host")


def accuracy_of(module: tvm.IRModule, images: int) -> float:
    vm = relax.VirtualMachine(tvm.compile(module, target=host.tvm_target()), tvm.cpu())
    hits = 0
    for x, y in zip(data.x_test[:images], data.y_test[:images]):
        hits += int(vm["main"](tvm.runtime.tensor(x[None])).numpy().argmax() == y)
    return hits / images


images = 100 if QUICK else len(data.x_test)
print(
    f"test accuracy on {images} images: dense {accuracy_of(mod, images):.3f}, "
    f"pruned {accuracy_of(pruned, images):.3f}"
)

# %%
# Tuning with MetaSchedule (demo budget)
# --------------------------------------
# Untuned TVM code on a CPU is an order of magnitude or more slower than tuned code, so a
# deployment build is tuned. MetaSchedule measures every candidate schedule on the hardware
# itself: for the RK3399 that means on the board, through an RPC tracker where the board
# registered under the key ``rk3399`` (tutorial 03 sets up a tracker). There is no board
# attached to this machine, so the demo below runs the *same call* for the ``x86-host``
# target, whose runner is local:
#
# * ``trials`` is the total number of measured candidates, ``trials_per_task`` the cap per
#   tuning task (a fused operator). The demo budget of a dozen trials tunes a few of the
#   model's tasks a little; the rest keep TVM's default schedules. It shows the mechanics,
#   not the speed a tuned build reaches.
# * ``work_dir`` holds MetaSchedule's JSON database. A later call with the same folder skips
#   finished tasks and goes on with the others, so a long run can be done in installments
#   or resumed after an interruption.
# * MetaSchedule tunes static shapes. The digits model's batch is symbolic (as ONNX
#   exporters write it), so tuning binds it to 1 and says so; the tuned library then takes
#   batch 1. ``shape_bindings={"batch": 8}`` (``--bind batch=8`` on the command line) tunes
#   for another size.
#
# A real budget is in the thousands of trials; on the command line, with boards registered
# at a tracker::
#
#     tvm-qmfrg compile MODEL.onnx --target arm-rk3399 --flops-reduction 0.5 --trials 2000 \
#         --tracker TRACKER_HOST:9190 --work-dir tune-rk3399 -o model.so
#
# and the same from Python::
#
#     tvm_qmfrg.targets.build(pruned, board, trials=2000, work_dir="tune-rk3399",
#                             tracker="TRACKER_HOST:9190", output="model.so")

print(
    "real budget: tvm-qmfrg compile MODEL.onnx --target arm-rk3399 --flops-reduction 0.5 "
    "--trials 2000 --tracker TRACKER_HOST:9190 --work-dir tune-rk3399 -o model.so"
)


def progress(p: tvm_qmfrg.targets.TuneProgress) -> None:
    best = f"{p.best_ms * 1e3:.1f} us" if p.best_ms is not None else "-"
    print(
        f"  task {p.task}/{p.tasks} {p.name}: {p.trials}/{p.budget} trials, best {best}", flush=True
    )


def latency_ms(artifact: tvm_qmfrg.targets.Artifact) -> float:
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact.path)), tvm.cpu())
    x = tvm.runtime.tensor(data.x_test[:1])
    timer = vm.time_evaluator("main", tvm.cpu(), number=20, repeat=5)
    return float(np.median(timer(x).results) * 1e3)


if DEMO_TRIALS:
    untuned = tvm_qmfrg.targets.build(
        pruned, host, output=OUT / "digits_x86_untuned.so", model="digits"
    )
    print(f"demo budget: {DEMO_TRIALS} trials, {DEMO_TRIALS_PER_TASK} per task (x86-host)")
    start = time.perf_counter()
    tuned = tvm_qmfrg.targets.build(
        pruned,
        host,
        trials=DEMO_TRIALS,
        trials_per_task=DEMO_TRIALS_PER_TASK,
        work_dir=OUT / "tune-x86",
        output=OUT / "digits_x86_tuned.so",
        model="digits",
        progress=progress,
    )
    print(f"tuned in {time.perf_counter() - start:.0f} s; database in {OUT / 'tune-x86'}")
    print(
        f"x86 latency, batch 1: untuned {latency_ms(untuned):.3f} ms, "
        f"after the demo budget {latency_ms(tuned):.3f} ms"
    )
else:
    print("quick mode: tuning skipped (it costs minutes even at the smallest budget)")

# %%
# Export the AArch64 library
# --------------------------
# ``build`` compiles for the config's target and links the ``.so`` with its cross compiler
# (``aarch64-linux-gnu-g++``). It is untuned here; with a board, ``trials=`` and ``tracker=``
# make it tuned, as above. The file is written under a temporary name and renamed, so a
# failed build never leaves a half-written library.

artifact = tvm_qmfrg.targets.build(pruned, board, output=OUT / "digits_rk3399.so", model="digits")
print(f"wrote {artifact.path} ({artifact.target}, {artifact.format}, tuned={artifact.tuned})")

# %%
# Check what was written: the ELF header says which machine the code is for. ``e_machine``
# 183 is AArch64 (62 would be x86-64); ``e_type`` 3 is a shared object.

EM_NAMES = {62: "x86-64", 183: "AArch64"}


def elf_header(path: Path) -> tuple[int, int, int]:
    raw = path.read_bytes()[:20]
    if raw[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not an ELF file")
    e_type, e_machine = struct.unpack_from("<HH", raw, 16)
    return raw[4], e_type, e_machine


elf_class, e_type, e_machine = elf_header(artifact.path)
print(
    f"{artifact.path.name}: ELF{32 * elf_class}, e_type {e_type} (shared object), "
    f"e_machine {e_machine} ({EM_NAMES.get(e_machine, 'other')})"
)

# %%
# On the board, the library loads with the TVM runtime alone (``pip install apache-tvm``
# there, or a runtime-only build)::
#
#     import numpy as np, tvm
#     from tvm import relax
#     vm = relax.VirtualMachine(tvm.runtime.load_module("digits_rk3399.so"), tvm.cpu())
#     logits = vm["main"](tvm.runtime.tensor(np.zeros((1, 1, 8, 8), "float32"))).numpy()
#
# or stays on the host and is timed over RPC: tutorial 03.

# %%
# Add your own board
# ------------------
# A new board is a new TOML file, no code changes. This one describes an NXP i.MX 8M Plus
# (four Cortex-A53 cores, 64-bit Linux). The ``[target]`` table is a TVM target dict (or a
# ``tag`` from ``tvm.target.list_tags()`` plus overrides); ``mcpu`` lets LLVM schedule for
# the A53 pipeline.

IMX8MP_TOML = """\
description = "NXP i.MX 8M Plus (4x Cortex-A53), aarch64 Linux, NEON fp32"
round_to = 4
format = "so"
cross_compiler = "aarch64-linux-gnu-g++"

[target]
kind = "llvm"
mtriple = "aarch64-linux-gnu"
mcpu = "cortex-a53"
mattr = ["+neon"]
num-cores = 4

[tuning]
trials = 1000
trials_per_task = 64

[runner]
kind = "rpc"
key = "imx8mp"
"""

toml_path = OUT / "imx8mp.toml"
toml_path.write_text(IMX8MP_TOML)
mine = tvm_qmfrg.targets.load(toml_path)
print(f"loaded {toml_path}: {mine.description}")
print(f"  [target] {dict(mine.target)}")

# %%
# Prune for it (the same plan applies, since the rounding is the same: ``QMFRGPrune(plan=)``
# reuses the decisions without the calibration data) and build.

reuse = QMFRGPrune(plan=prune.plan, names=names)
own = tvm_qmfrg.targets.build(reuse(mod), mine, output=OUT / "digits_imx8mp.so", model="digits")
elf_class, e_type, e_machine = elf_header(own.path)
print(f"wrote {own.path}: e_machine {e_machine} ({EM_NAMES.get(e_machine, 'other')})")

# %%
# Mistakes in a config are caught when it is loaded, with the file and the key named:

broken = OUT / "broken.toml"
broken.write_text(IMX8MP_TOML.replace("round_to = 4", "round-to = 4"))
try:
    tvm_qmfrg.targets.load(broken)
except OptionError as exc:
    print(f"OptionError: {exc}")

# %%
# To use the new board from the command line, pass the path where a shipped name would go::
#
#     tvm-qmfrg compile MODEL.onnx --target imx8mp.toml --flops-reduction 0.3 -o model.so
