"""
Benchmark on a device over RPC, and tune through a tracker
==========================================================

Latency that matters is measured on the device that will run the model. TVM's RPC lets the
build machine upload a library to a device, run it there and time it with
``time_evaluator``; a *tracker* hands out devices registered under a key, so tuning and
benchmarking can use a farm of boards.

This tutorial plays both sides on one machine. The "devices" are TVM RPC servers started by
the script on 127.0.0.1 (never on a public interface) and stopped when it ends. Everything
it does is what you would do with real boards; the last section lists what changes.

Run it with ``python tutorials/03_benchmark_on_device_over_rpc.py``. Outputs go to
``tutorial_out/03_benchmark_on_device_over_rpc/`` (``TVM_QMFRG_TUTORIAL_OUT`` changes the
root folder); ``TVM_QMFRG_TUTORIAL_QUICK=1`` shrinks the repeats and skips the tuning demo.
"""

# %%
# Setup
# -----

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import onnx
import tvm
import tvm_qmfrg.targets
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx
from tvm_qmfrg.passes import QMFRGPrune
from tvm_qmfrg.targets import rpc

from tvm_qmfrg.apps.datasets import load_digits_splits
from tvm_qmfrg.onnxio.reader import default_model_path, operator_names

QUICK = os.environ.get("TVM_QMFRG_TUTORIAL_QUICK") == "1"
OUT = (
    Path(os.environ.get("TVM_QMFRG_TUTORIAL_OUT", "tutorial_out"))
    / "03_benchmark_on_device_over_rpc"
)
OUT.mkdir(parents=True, exist_ok=True)

REPEAT, NUMBER = (3, 5) if QUICK else (10, 20)  # time_evaluator: repeats x runs per repeat
TUNE_TRIALS = 0 if QUICK else 8  # a demo budget: two batches of candidates
TUNE_TRIALS_PER_TASK = 4

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)

# %%
# An artifact to benchmark
# ------------------------
# The digits ResNet, pruned by 30% of its FLOPs in data-aware mode with the host target's
# channel rounding, built untuned for ``x86-host`` (this machine) and exported as a ``.so``.

host = tvm_qmfrg.targets.load("x86-host")
onnx_model = onnx.load(default_model_path())
names = operator_names(onnx_model)
data = load_digits_splits(seed=0)
mod = from_onnx(onnx_model, shape_dict={"input": [1, 1, 8, 8]}, keep_params_in_input=False)
prune = QMFRGPrune(
    flops_reduction=0.3, round_to=host.round_to, names=names, calibration=data.x_train[:256]
)
pruned = prune(mod)
print(f"pruned: {prune.plan.flops_reduction:.1%} fewer FLOPs")
artifact = tvm_qmfrg.targets.build(pruned, host, output=OUT / "digits_x86.so", model="digits")
print(f"wrote {artifact.path}")

# %%
# The reference output is computed here, from the Relax module itself rather than from the
# exported file, so the comparison covers export, upload and remote loading.

x = data.x_test[:1]
reference_vm = relax.VirtualMachine(tvm.compile(pruned, target=host.tvm_target()), tvm.cpu())
reference = reference_vm["main"](tvm.runtime.tensor(x)).numpy()
print(f"host reference: predicted digit {reference.argmax()} (label {data.y_test[0]})")

# %%
# One device, direct connection
# -----------------------------
# ``rpc.local_server()`` starts a ``tvm.rpc.Server`` on 127.0.0.1 and yields its address;
# leaving the ``with`` block stops it. ``rpc.bench`` uploads the library, loads it on the
# server, runs ``main`` once to check the output against the reference, then times it with
# ``time_evaluator`` (``repeat`` samples, each the mean of ``number`` runs).


def show(label: str, result: rpc.BenchResult) -> None:
    check = {True: "matches", False: "DIFFERS", None: "not checked"}[result.output_matches]
    print(
        f"{label}: mean {result.mean_ms:.4f} ms  median {result.median_ms:.4f} ms  "
        f"std {result.std_ms:.4f} ms  over {result.repeats} repeats; output {check}"
        + (
            f" (max abs error {result.max_abs_error:.2g})"
            if result.max_abs_error is not None
            else ""
        )
    )


with rpc.local_server() as (server_host, server_port):
    print(f"RPC server on {server_host}:{server_port}")
    result = rpc.bench(
        artifact.path,
        server_host,
        server_port,
        inputs=[x],
        reference=reference,
        repeat=REPEAT,
        number=NUMBER,
    )
    show("untuned over RPC", result)

    # The same from the command line. ``tvm-qmfrg bench`` feeds random inputs of the given
    # shapes and, for a library built for this machine, checks the output against a local
    # run of the same file.
    command = [
        "tvm-qmfrg", "bench", str(artifact.path), "--rpc", f"{server_host}:{server_port}",
        "--input-shape", "input=1,1,8,8", "--repeat", str(REPEAT), "--number", str(NUMBER),
    ]  # fmt: skip
    print("$", " ".join(command))
    # run as ``python -m tvm_qmfrg.cli``: the same program, from this Python environment
    cli = [sys.executable, "-m", "tvm_qmfrg.cli", *command[1:]]
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    print(proc.stdout.rstrip())
    if proc.returncode != 0:
        sys.exit(f"tvm-qmfrg bench failed: {proc.stderr.strip()}")

# %%
# A tracker and a farm of two devices
# -----------------------------------
# A tracker is a directory of devices: each RPC server registers with it under a *key* (the
# kind of device), and a client asks for "a free device of key K". Two servers register here
# under ``x86-farm``; ``rpc.bench`` with ``key=`` goes through the tracker.
#
# For tuning, the target config names the runner: ``kind = "rpc"`` and the key. The shipped
# ``x86-host`` config measures locally, so a variant of it is written with an RPC runner.

FARM_TOML = """\
description = "This x86-64 machine, measured through an RPC tracker (tutorial farm)"
round_to = 8
format = "so"
cross_compiler = "none"

[target]
kind = "llvm"
mcpu = "auto"
num-cores = "auto"

[tuning]
trials = 1000
trials_per_task = 64

[runner]
kind = "rpc"
key = "x86-farm"
"""
farm_toml = OUT / "x86-farm.toml"
farm_toml.write_text(FARM_TOML)
farm = tvm_qmfrg.targets.load(farm_toml)

with (
    rpc.local_tracker() as tracker,
    rpc.local_server(tracker=tracker, key=farm.runner.key),
    rpc.local_server(tracker=tracker, key=farm.runner.key),
):
    tracker_addr = f"{tracker[0]}:{tracker[1]}"
    print(f"tracker on {tracker_addr}")
    session = tvm.rpc.connect_tracker(*tracker)
    for _ in range(100):  # the second server may still be registering: wait for both
        queue = session.summary()["queue_info"].get(farm.runner.key, {})
        if queue.get("free", 0) == 2:
            break
        time.sleep(0.1)
    print(session.text_summary())
    session.close()

    untuned = rpc.bench(
        artifact.path, *tracker, key=farm.runner.key, inputs=[x], reference=reference,
        repeat=REPEAT, number=NUMBER,
    )  # fmt: skip
    show(f"untuned via tracker (key {farm.runner.key})", untuned)

    # Tuning through the tracker. With an RPC runner, MetaSchedule builds candidates here
    # and measures them on the tracker's devices, one worker per registered server, so a
    # farm of N boards measures N candidates at a time. The budget is a demo (two batches
    # of candidates on a few of the model's tasks); a real one is in the thousands.
    def progress(p: tvm_qmfrg.targets.TuneProgress) -> None:
        best = f"{p.best_ms * 1e3:.1f} us" if p.best_ms is not None else "-"
        print(
            f"  task {p.task}/{p.tasks} {p.name}: {p.trials}/{p.budget} trials, best {best}",
            flush=True,
        )

    if TUNE_TRIALS:
        print(f"tuning: demo budget of {TUNE_TRIALS} trials through {tracker_addr}")
        start = time.perf_counter()
        tuned = tvm_qmfrg.targets.build(
            pruned,
            farm,
            trials=TUNE_TRIALS,
            trials_per_task=TUNE_TRIALS_PER_TASK,
            tracker=tracker_addr,
            work_dir=OUT / "tune",
            output=OUT / "digits_x86_tuned.so",
            model="digits",
            progress=progress,
        )
        print(f"tuned in {time.perf_counter() - start:.0f} s, wrote {tuned.path}")
        after = rpc.bench(
            tuned.path, *tracker, key=farm.runner.key, inputs=[x], reference=reference,
            repeat=REPEAT, number=NUMBER,
        )  # fmt: skip
        show(f"demo-tuned via tracker (key {farm.runner.key})", after)
    else:
        print("quick mode: tuning skipped (it costs minutes even at the smallest budget)")

print("servers and tracker stopped")

# %%
# With real boards
# ----------------
# Nothing in the code above changes; the processes move:
#
# * On a machine every board can reach, start the tracker (it listens on all interfaces;
#   keep it inside your lab network)::
#
#       python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190
#
# * On each board (with the TVM runtime installed), start a server that registers under the
#   board's key, the ``[runner] key`` of its target config::
#
#       python -m tvm.exec.rpc_server --tracker TRACKER_HOST:9190 --key rk3399
#
# * Check who is registered::
#
#       python -m tvm.exec.query_rpc_tracker --host TRACKER_HOST --port 9190
#
# * Tune and export (measurements run on the boards, one worker per free board)::
#
#       tvm-qmfrg compile MODEL.onnx --target arm-rk3399 --flops-reduction 0.5 \
#           --trials 2000 --tracker TRACKER_HOST:9190 -o model.so
#
# * Benchmark on a board::
#
#       tvm-qmfrg bench model.so --rpc TRACKER_HOST:9190 --key rk3399 \
#           --input-shape input=1,1,8,8
#
# A library cross-compiled for the board cannot run on the build machine, so ``bench`` has
# no local reference for it: pass ``reference=`` from a host build of the same module, as
# done above (on the command line ``--reference host.so``), to check the board's output too.
# Prune once (``tvm-qmfrg prune ... -o pruned.onnx``) and compile that file for both
# targets, so both libraries hold the same module. Timings on a board vary with its clock
# governor and temperature: pin the governor to ``performance`` and compare medians.
#
# No board yet? ``benchmarks/bench_qemu_board.py`` builds an emulated one (an arm64 Debian
# userland with TVM's aarch64 wheel, its RPC server under ``qemu-aarch64-static``) and runs
# every step above against it: correct outputs, emulated timings.
