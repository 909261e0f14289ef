"""RPC benchmarking: a real tvm.rpc server on 127.0.0.1 runs an artifact built by `compile`.

The server and tracker are started and stopped by the tests (targets.rpc's context managers).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from tvm_qmfrg.targets import rpc

from tvm_qmfrg import OptionError
from tvm_qmfrg.onnxio import synthetic

CLI = [sys.executable, "-m", "tvm_qmfrg.cli"]


def _cli(*args, timeout=240):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """An x86-host .so of a pruned MLP, built by `tvm-qmfrg compile` (untuned)."""
    tmp = tmp_path_factory.mktemp("rpc")
    model = tmp / "mlp.onnx"
    onnx.save(synthetic.mlp(), str(model))
    out = tmp / "deploy" / "mlp.so"
    proc = _cli("compile", str(model), "--target", "x86-host", "--sparsity", "0.25", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out} (x86-host, so, untuned)" in proc.stdout
    assert "pruning for x86-host (channels rounded to 8)" in proc.stdout
    assert out.stat().st_size > 0
    return out


def test_server_runs_the_artifact_and_matches_local_vm(compiled):
    x = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)
    expected = rpc.local_outputs(compiled, [x])
    assert expected.shape == (1, 10)
    with rpc.local_server() as (host, port):
        assert host == "127.0.0.1"
        result = rpc.bench(compiled, host, port, inputs=[x], reference=expected, repeat=3, number=2)
    assert result.output_matches is True and result.max_abs_error <= 1e-5
    assert result.repeats == 3
    assert 0 < result.median_ms and 0 < result.mean_ms and result.std_ms >= 0
    # without a reference, the host artifact is run locally for one
    with rpc.local_server() as (host, port):
        again = rpc.bench(compiled, host, port, inputs=[x], repeat=2, number=1)
    assert again.output_matches is True


def test_wrong_reference_is_reported(compiled):
    x = np.zeros((1, 32), np.float32)
    with rpc.local_server() as (host, port):
        result = rpc.bench(compiled, host, port, inputs=[x], reference=np.ones((1, 10)), repeat=1)
    assert result.output_matches is False


def test_bench_cli_prints_timings(compiled):
    with rpc.local_server() as (host, port):
        proc = _cli(
            "bench", str(compiled), "--rpc", f"{host}:{port}",
            "--input-shape", "input=1,32", "--repeat", "3", "--number", "2",
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "mean " in proc.stdout and " median " in proc.stdout and " std " in proc.stdout
    assert "over 3 repeats" in proc.stdout
    assert "output matches the local reference" in proc.stdout


def test_bench_without_input_shape_reads_the_signature_compile_wrote(compiled):
    signature = json.loads(compiled.with_name(compiled.name + ".json").read_text())
    assert signature["artifact"] == compiled.name
    assert signature["inputs"] == [{"name": "input", "shape": [1, 32], "dtype": "float32"}]
    with rpc.local_server() as (host, port):
        proc = _cli("bench", str(compiled), "--rpc", f"{host}:{port}", "--repeat", "2")
    assert proc.returncode == 0, proc.stderr
    assert "output matches the local reference" in proc.stdout and "over 2 repeats" in proc.stdout


def test_bench_through_a_tracker(compiled):
    x = np.ones((1, 32), np.float32)
    with rpc.local_tracker() as tracker, rpc.local_server(tracker=tracker, key="x86-test"):
        result = rpc.bench(compiled, *tracker, key="x86-test", inputs=[x], repeat=2, number=1)
    assert result.output_matches is True


def test_bench_errors_are_one_line(compiled, tmp_path):
    proc = _cli("bench", str(compiled), "--rpc", "127.0.0.1:1", "--input-shape", "input=1,32")
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "tvm-qmfrg bench: error: RPC server 127.0.0.1:1: cannot open an RPC session"
    )
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = _cli("bench", str(compiled), "--rpc", "nohostport", "--input-shape", "input=1,32")
    assert proc.returncode == 1 and "HOST:PORT" in proc.stderr
    proc = _cli(
        "bench", str(Path(tmp_path) / "none.so"), "--rpc", "127.0.0.1:9", "--input-shape", "a=1"
    )
    assert proc.returncode == 1 and "no such file" in proc.stderr
    with rpc.local_server() as (host, port):
        for extra in ([], ["--reference", str(compiled)]):  # fails remotely / here first
            proc = _cli(
                "bench", str(compiled), "--rpc", f"{host}:{port}", "--input-shape", "input=1,31",
                *extra,
            )  # fmt: skip
            assert proc.returncode == 1 and "(31 vs. 32)" in proc.stderr, proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    with pytest.raises(OptionError, match="input-shape"):
        from tvm_qmfrg.cli import _parse_shape

        _parse_shape("input=1,x")


def test_bench_cli_checks_against_a_reference_library(compiled, tmp_path):
    # the artifact for a board cannot run here: a host build of the same model is the reference
    other = tmp_path / "other.onnx"
    onnx.save(synthetic.mlp(seed=1), str(other))
    different = tmp_path / "other.so"
    assert _cli("compile", str(other), "--target", "x86-host", "-o", str(different)).returncode == 0
    args = ["--input-shape", "input=1,32", "--repeat", "1", "--number", "1"]
    with rpc.local_server() as (host, port):
        same = _cli(
            "bench", str(compiled), "--rpc", f"{host}:{port}", "--reference", str(compiled), *args
        )
        wrong = _cli(
            "bench", str(compiled), "--rpc", f"{host}:{port}", "--reference", str(different), *args
        )
    assert same.returncode == 0 and "output matches the local reference" in same.stdout, same.stderr
    assert wrong.returncode == 1 and "output DIFFERS from the local reference" in wrong.stdout
    onnx_file = tmp_path / "not-a-library.onnx"
    onnx_file.write_bytes(b"x")
    proc = _cli(
        "bench", str(compiled), "--rpc", "127.0.0.1:9", "--reference", str(onnx_file), *args
    )
    assert proc.returncode == 1 and "not a shared library built for this machine" in proc.stderr


def test_compile_bind_errors_are_one_line(tmp_path):
    model = tmp_path / "mlp.onnx"
    onnx.save(synthetic.mlp(), str(model))
    base = ["compile", str(model), "--target", "x86-host", "-o", str(tmp_path / "m.so")]
    proc = _cli(*base, "--bind", "batch")
    assert proc.returncode == 1 and "must be DIM=SIZE" in proc.stderr
    proc = _cli(*base, "--bind", "batch=2")
    assert proc.returncode == 1 and "needs --trials > 0" in proc.stderr
    assert not (tmp_path / "m.so").exists()
