"""The tutorials run top to bottom in quick mode and produce what they promise.

Each tutorial is a plain script run as a subprocess with ``TVM_QMFRG_TUTORIAL_QUICK=1`` (small
budgets) and ``TVM_QMFRG_TUTORIAL_OUT`` pointing at a temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tvm_qmfrg.plan import PruningPlan

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
EM_AARCH64 = 183
ET_DYN = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIMING = re.compile(r"mean \d+\.\d+ ms\s+median \d+\.\d+ ms\s+std \d+\.\d+ ms\s+over \d+ repeats")


def run_tutorial(name: str, out: Path, timeout: int = 420) -> subprocess.CompletedProcess:
    env = dict(os.environ, TVM_QMFRG_TUTORIAL_QUICK="1", TVM_QMFRG_TUTORIAL_OUT=str(out))
    proc = subprocess.run(
        [sys.executable, str(TUTORIALS / name)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=out,
        env=env,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def elf_header(path: Path) -> tuple[int, int, int]:
    raw = path.read_bytes()[:20]
    assert raw[:4] == b"\x7fELF", f"{path} is not an ELF file"
    e_type, e_machine = struct.unpack_from("<HH", raw, 16)
    return raw[4], e_type, e_machine


def png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_tutorials_folder_holds_the_four_scripts():
    assert sorted(p.name for p in TUTORIALS.glob("*.py")) == [
        "01_insert_pass_in_tvm_build.py",
        "02_cross_compile_for_an_edge_board.py",
        "03_benchmark_on_device_over_rpc.py",
        "04_spectral_geometry_explained.py",
    ]


def test_01_insert_pass_in_tvm_build(tmp_path):
    proc = run_tutorial("01_insert_pass_in_tvm_build.py", tmp_path)
    out = proc.stdout
    assert "group" in out and "channels  kept  merged  pruned" in out
    assert re.search(r"FLOPs\s+[\d,]+ -> [\d,]+ \(\d+\.\d% fewer\)", out)
    assert "frozen groups" in out and "/fc/Gemm" in out
    assert re.search(r"dense: test accuracy 0\.9\d+", out)
    assert re.search(r"data-free, 30\.\d% fewer FLOPs: test accuracy [01]\.\d+", out)
    assert re.search(r"data-aware, 30\.\d% fewer FLOPs: test accuracy [01]\.\d+", out)
    assert re.search(r"replayed batch-1 module matches \(max abs difference", out)
    plan = PruningPlan.load(tmp_path / "01_insert_pass_in_tvm_build" / "plan_data_aware.json")
    assert plan.options["calibrated"] and abs(plan.flops_reduction - 0.3) < 0.02


@pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None, reason="needs the AArch64 cross compiler"
)
def test_02_cross_compile_for_an_edge_board(tmp_path):
    proc = run_tutorial("02_cross_compile_for_an_edge_board.py", tmp_path)
    folder = tmp_path / "02_cross_compile_for_an_edge_board"
    for name in ("digits_rk3399.so", "digits_imx8mp.so"):
        elf_class, e_type, e_machine = elf_header(folder / name)
        assert (elf_class, e_type, e_machine) == (2, ET_DYN, EM_AARCH64), name
    out = proc.stdout
    assert "every kept channel count is a multiple of 4: True" in out
    assert "e_machine 183 (AArch64)" in out
    assert "tvm-qmfrg compile MODEL.onnx --target arm-rk3399" in out and "--trials 2000" in out
    assert "OptionError:" in out and "unknown key 'round-to'" in out
    assert (folder / "imx8mp.toml").is_file()
    assert "quick mode: tuning skipped" in out


def test_03_benchmark_on_device_over_rpc(tmp_path):
    proc = run_tutorial("03_benchmark_on_device_over_rpc.py", tmp_path)
    out = proc.stdout
    # direct server, the CLI, and via the tracker (quick mode skips the tuning demo)
    assert len(TIMING.findall(out)) == 3, out
    assert out.count("output matches") == 3
    assert "$ tvm-qmfrg bench" in out
    assert "untuned via tracker (key x86-farm)" in out
    assert "server:x86-farm" in out  # the tracker's summary lists the two servers
    assert "quick mode: tuning skipped" in out
    assert "servers and tracker stopped" in out
    folder = tmp_path / "03_benchmark_on_device_over_rpc"
    assert (folder / "digits_x86.so").is_file() and (folder / "x86-farm.toml").is_file()


def test_04_spectral_geometry_explained(tmp_path):
    proc = run_tutorial("04_spectral_geometry_explained.py", tmp_path)
    folder = tmp_path / "04_spectral_geometry_explained"
    figures = ["spectra.png", "sphere.png", "distances.png", "qmfrg_layer.png", "rotated_twin.png"]
    for name in figures:
        width, height = png_size(folder / name)
        assert width > 100 and height > 100, name
        assert f"wrote {folder / name}" in proc.stdout
    out = proc.stdout
    assert re.search(r"rotated twin U W\s+\S+\s+\S+\s+\S+\s+differs", out)
    assert re.search(r"scaled twin 2 W\s+\S+\s+2\s+\S+\s+equivalent", out)
    assert "differs (residual" in out  # the CLI's direct check on the fc pair
