"""An emulated AArch64 board: cross-compiled libraries run over TVM RPC under qemu-user.

The board is an arm64 Debian userland (debootstrap's first stage: packages unpacked, nothing
executed, so no chroot or binfmt_misc is needed) with apache-tvm's aarch64 wheels installed
by pip for that platform, and ``python -m tvm.exec.rpc_server`` running under
``qemu-aarch64-static``, registered with a local tracker. On it, for the shipped digits
model, dense and pruned (qmfrg, 30 % FLOPs, the ``arm-rk3399`` channel rounding):

1. the untuned ``arm-rk3399`` libraries (linked here with the aarch64 cross g++) are
   uploaded, run and timed, and their outputs checked against the x86-host build of the same
   module;
2. a short MetaSchedule tuning run for the board goes through the tracker (candidates
   cross-linked here, measured on the emulated board), and the tuned library is checked the
   same way.

Timings are qemu's emulation on this host, not a board's: they show that the path works end
to end, not how fast an RK3399 is. Needs (Debian)::

    apt-get install -y qemu-user-static debootstrap gcc-aarch64-linux-gnu g++-aarch64-linux-gnu
    .venv/bin/python benchmarks/bench_qemu_board.py [--root DIR] [--trials 32]

The userland (~600 MB) is kept in ``--root`` and reused by later runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from tvm_qmfrg.passes.importer import import_onnx
from tvm_qmfrg.passes.prune import prune_module
from tvm_qmfrg.targets import build, export, rpc
from tvm_qmfrg.targets import load as load_target
from tvm_qmfrg.targets.build import compile_tuned
from tvm_qmfrg.targets.tune import tune

from tvm_qmfrg.apps.datasets import load_digits_splits
from tvm_qmfrg.onnxio.reader import default_model_path
from tvm_qmfrg.report import write_json

logger = logging.getLogger("bench_qemu_board")

SUITE = "bookworm"  # its python3 is 3.11, the wheels below are fetched for that
MIRROR = "http://deb.debian.org/debian"
KEY = "qemu-aarch64"
SITE = "opt/tvm-site"


def require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        sys.exit(f"bench_qemu_board: '{tool}' not found; apt-get install -y {package}")
    return path


def setup_userland(root: Path) -> None:
    """An arm64 Debian minbase with python3 unpacked in ``root``, TVM's aarch64 wheels in it."""
    python = root / "usr/bin/python3"
    if not python.exists():
        require("debootstrap", "debootstrap")
        logger.info("unpacking an arm64 Debian %s userland into %s", SUITE, root)
        subprocess.run(
            ["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
             "--include=python3", SUITE, str(root), MIRROR],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        # the first stage unpacks only the required packages; python3 and its libraries
        # are downloaded but left for the (emulated) second stage: unpack them here
        for deb in sorted((root / "var/cache/apt/archives").glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    if not (root / SITE / "tvm").is_dir():
        pins = [
            f"apache-tvm=={importlib.metadata.version('apache-tvm')}",
            f"apache-tvm-ffi=={importlib.metadata.version('apache-tvm-ffi')}",
        ]
        logger.info("installing %s for aarch64 into %s", " ".join(pins), root / SITE)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(root / SITE),
             "--platform", "manylinux_2_17_aarch64", "--platform", "manylinux_2_28_aarch64",
             "--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:",
             *pins, "cloudpickle", "psutil"],
            check=True,
        )  # fmt: skip


def python_launcher(root: Path) -> Path:
    """A host script that starts the board's python3 under qemu.

    TVM's RPC server starts worker processes with ``sys.executable``; without binfmt_misc the
    host kernel cannot exec an arm64 binary, so ``sys.executable`` is set (qemu ``-0``) to
    this script, which the kernel can run.
    """
    qemu = require("qemu-aarch64-static", "qemu-user-static")
    launcher = root.parent / f"{root.name}-python3"
    launcher.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH="{root / SITE}" exec {qemu} -L "{root}" -0 "{launcher}" '
        f'"{root}/usr/bin/python3" "$@"\n'
    )
    launcher.chmod(0o755)
    return launcher


@contextlib.contextmanager
def emulated_board(launcher: Path, tracker: tuple[str, int], timeout: float = 120.0):
    """``tvm.exec.rpc_server`` under qemu, registered with ``tracker`` under :data:`KEY`."""
    proc = subprocess.Popen(
        [str(launcher), "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
         "--port", "9400", "--port-end", "9500", "--tracker", f"{tracker[0]}:{tracker[1]}",
         "--key", KEY, "--custom-addr", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while not rpc.is_registered(tracker, KEY):
            if proc.poll() is not None:
                raise RuntimeError(f"the emulated board's RPC server exited: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the emulated board did not register within {timeout:.0f} s")
            time.sleep(0.5)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def measure(board_lib: Path, host_lib: Path, tracker, x: np.ndarray) -> dict:
    """Time ``board_lib`` on the emulated board; check it against ``host_lib`` run here."""
    reference = rpc.local_outputs(host_lib, [x])
    r = rpc.bench(board_lib, *tracker, key=KEY, inputs=[x], reference=reference, repeat=5)
    return {
        "median_ms": round(r.median_ms, 3),
        "std_ms": round(r.std_ms, 3),
        "output_matches": r.output_matches,
        "max_abs_error": r.max_abs_error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=Path.home() / ".cache/tvm_qmfrg/arm64-board",
        help="the board's userland (created on first use)",
    )  # fmt: skip
    parser.add_argument("--trials", type=int, default=32, help="MetaSchedule trials")
    parser.add_argument("--out", default="benchmarks/results/qemu_board.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("tvm_qmfrg.targets.tune").setLevel(logging.WARNING)

    root = args.root.resolve()
    root.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    setup_userland(root)
    launcher = python_launcher(root)
    board_python = subprocess.run(
        [str(launcher), "-c", "import platform, tvm; print(platform.machine(), tvm.__version__)"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    setup_s = time.perf_counter() - t0
    logger.info("board: %s, tvm %s (setup %.0f s)", *board_python, setup_s)

    board = load_target("arm-rk3399")
    board = dataclasses.replace(board, runner=dataclasses.replace(board.runner, key=KEY))
    host = load_target("x86-host")
    dense = import_onnx(onnx.load(default_model_path()))
    plan, pruned = prune_module(dense, flops_reduction=0.3, round_to=board.round_to)
    x = np.ascontiguousarray(load_digits_splits().x_test[:1])

    results: dict = {
        "command": "python benchmarks/bench_qemu_board.py --trials " + str(args.trials),
        "host": platform.machine(),
        "board": {"machine": board_python[0], "tvm": board_python[1], "emulator": "qemu-user"},
        "target": board.name,
        "pruning": {"criterion": "qmfrg", "flops_reduction": round(plan.flops_reduction, 4)},
        "note": "latencies are qemu-user emulation on the host, not a board's",
    }
    with tempfile.TemporaryDirectory() as tmp, rpc.local_tracker() as tracker:
        out = Path(tmp)
        with emulated_board(launcher, tracker):
            for name, mod in (("dense", dense), ("pruned", pruned)):
                board_lib = build(mod, board, output=out / f"{name}-arm.so").path
                host_lib = build(mod, host, output=out / f"{name}-x86.so").path
                results[f"untuned_{name}"] = measure(board_lib, host_lib, tracker, x)
                logger.info("untuned %s: %s", name, results[f"untuned_{name}"])

            t1 = time.perf_counter()
            summary = tune(
                pruned, board, work_dir=out / "tune", trials=args.trials,
                tracker=f"{tracker[0]}:{tracker[1]}", model="digits_resnet (pruned)",
            )  # fmt: skip
            tuned = compile_tuned(pruned, board, out / "tune", model="digits_resnet (pruned)")
            tuned_lib = out / "pruned-arm-tuned.so"
            export(tuned, board, tuned_lib)
            results["tuned_pruned"] = {
                "trials": args.trials,
                "tasks": len(summary.tasks),
                "tasks_measured": sum(1 for t in summary.tasks if t.records_after > 0),
                "records": summary.new_records,
                "tune_and_build_s": round(time.perf_counter() - t1, 1),
                **measure(tuned_lib, out / "pruned-x86.so", tracker, x),
            }
            logger.info("tuned pruned: %s", results["tuned_pruned"])
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json(args.out, results)
    print(f"wrote {args.out}")
    for key in ("untuned_dense", "untuned_pruned", "tuned_pruned"):
        print(f"{key:15s} {results[key]}")


if __name__ == "__main__":
    main()
