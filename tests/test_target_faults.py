"""Deployment faults: broken configs and databases, a busy work dir, silent or absent boards.

Real components only: MetaSchedule's own JSONDatabase writes the databases that are then torn,
a real ``flock`` holds the work dir, a real TVM RPC tracker runs on 127.0.0.1, and the silent
board is a TCP listener on 127.0.0.1 that accepts connections and never answers. CLI cases run
``tvm-qmfrg`` as a subprocess: exit 1, one ``error:`` line, no traceback, nothing written.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from helpers import load, random_input, run
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm_qmfrg.targets import build, compile_module, rpc
from tvm_qmfrg.targets import load as load_target
from tvm_qmfrg.targets.tune import (
    DONE_FILE,
    LOCK_FILE,
    RECORD_FILE,
    WORKLOAD_FILE,
    count_records,
    prepare,
    repair_database,
    work_dir_lock,
)

from tvm_qmfrg.errors import BuildError, DeviceError, OptionError, QMFRGError
from tvm_qmfrg.onnxio import synthetic

CLI = [sys.executable, "-m", "tvm_qmfrg.cli"]
TESTS = Path(__file__).parent


def _cli(*args, timeout=120):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "mlp.onnx"
    onnx.save(synthetic.mlp(), str(path))
    return path


@pytest.fixture(scope="module")
def mlp_so(tmp_path_factory) -> Path:
    """An untuned x86-host .so of the MLP (input 1x32), with its input signature."""
    out = tmp_path_factory.mktemp("lib") / "mlp.so"
    build(load(synthetic.mlp()), "x86-host", output=out, model="mlp")
    return out


@pytest.fixture
def silent_board():
    """``(host, port)`` of a TCP listener on 127.0.0.1 that accepts and never answers."""
    server = socket.socket()
    server.bind((rpc.LOCALHOST, 0))
    server.listen(8)
    accepted: list[socket.socket] = []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed at teardown
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()
    server.close()
    for conn in accepted:
        conn.close()


# -- 1. BuildError and DeviceError -----------------------------------------------------------


def test_a_module_tvm_cannot_compile_is_a_build_error_naming_model_and_target():
    # relax.ewise_fma has no legalization: VM codegen refuses it
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3), "float32"))
    with bb.function("main", [x]):
        bb.emit_func_output(bb.emit(relax.op.ewise_fma(x, x, x)))
    with pytest.raises(BuildError) as err:
        compile_module(bb.get(), "x86-host", model="fma-model")
    message = str(err.value)
    assert isinstance(err.value, QMFRGError)
    assert message.startswith("fma-model: TVM failed to compile it for x86-host: ")
    assert "CodeGenVM cannot emit" in message and "\n" not in message
    assert err.value.__cause__ is not None  # the TVM error stays chained for debugging


RPC_TOML = """\
description = "this machine, measured through an RPC tracker"
round_to = 8
format = "so"
cross_compiler = "none"

[target]
kind = "llvm"

[tuning]
trials = 2
trials_per_task = 2

[runner]
kind = "rpc"
key = "fault-board"
"""


def test_tuning_through_an_unreachable_tracker_is_a_device_error_at_once(tmp_path):
    from tvm_qmfrg.targets import tune

    config_path = tmp_path / "board.toml"
    config_path.write_text(RPC_TOML)
    mod = load(synthetic.mlp(sizes=(16, 8)))
    start = time.monotonic()
    with pytest.raises(DeviceError, match=r"RPC tracker 127\.0\.0\.1:1: .*refused"):
        tune(mod, config_path, work_dir=tmp_path / "db", tracker="127.0.0.1:1")
    assert time.monotonic() - start < 5  # not the 60 s of connect_with_retry
    with rpc.local_tracker() as tracker:
        with pytest.raises(
            DeviceError, match="no board registered under key 'fault-board' \\(registered: none\\)"
        ):
            tune(mod, config_path, work_dir=tmp_path / "db", tracker=f"{tracker[0]}:{tracker[1]}")
    assert not (tmp_path / "db" / LOCK_FILE).exists()


# -- 2. broken target config files ------------------------------------------------------------

GOOD_TOML = RPC_TOML.replace('kind = "rpc"\nkey = "fault-board"', 'kind = "local"')
BROKEN_CONFIGS = {
    "bad-utf8": (GOOD_TOML.replace("this machine", "caf\xe9").encode("latin-1"), "not UTF-8"),
    "bad-syntax": (b'description = "no end\nround_to = 8\n', "not valid TOML"),
    "unbalanced-quote": (
        GOOD_TOML.replace('"none"', '"g++ \'-O2"').encode(),
        "key 'cross_compiler': cannot split",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_CONFIGS))
def test_a_broken_target_config_is_one_line_naming_the_file(mlp_onnx, tmp_path, case):
    data, expected = BROKEN_CONFIGS[case]
    config_path = tmp_path / f"{case}.toml"
    config_path.write_bytes(data)
    before = _files(tmp_path)
    proc = _cli(
        "compile", str(mlp_onnx), "--target", str(config_path), "-o", str(tmp_path / "m.so")
    )
    line = _one_line_error(proc)
    assert str(config_path) in line and expected in line, line
    assert _files(tmp_path) == before


# -- 3. a torn database and done-file resume --------------------------------------------------


def _seed_database(work: Path, mod, config) -> None:
    """One real record for the single task of ``mod``, written by MetaSchedule's JSONDatabase
    (a schedule that only looks up a block: what a finished one-trial run may leave)."""
    target = config.tvm_target()
    (task,) = ms.relax_integration.extract_tasks(prepare(mod, target), target)
    workload_mod = task.dispatched[0]
    work.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(work), module_equality="structural")
    workload = database.commit_workload(workload_mod)
    schedule = tvm.s_tir.Schedule(workload_mod)
    schedule.get_sblock("root")  # an empty trace is no valid record
    database.commit_tuning_record(
        ms.database.TuningRecord(
            schedule.trace,
            workload,
            run_secs=[1e-5],
            target=target,
            args_info=ms.arg_info.ArgInfo.from_prim_func(workload_mod["main"]),
        )
    )


@pytest.mark.parametrize("damage", ["torn-last-line", "garbage-line"])
def test_a_damaged_database_and_done_file_are_skipped_with_warnings_and_the_run_resumes(
    tmp_path, caplog, damage
):
    model = synthetic.mlp(sizes=(16, 8))  # one dense layer: one task
    mod = load(model)
    work = tmp_path / "db"
    _seed_database(work, mod, load_target("x86-host"))
    records = work / RECORD_FILE
    good = records.read_bytes()
    if damage == "torn-last-line":  # power cut while MetaSchedule appended a record
        records.write_bytes(good + good[: len(good) // 2])
    else:
        records.write_bytes(good + b"\x00\x17 not json\n")
    (work / DONE_FILE).write_text('{"123": null, "456": "many"}')

    with caplog.at_level(logging.WARNING, logger="tvm_qmfrg.targets.tune"):
        artifact = build(mod, "x86-host", work_dir=work, trials=1, trials_per_task=1, model="mlp")

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    why = "torn (cut off mid-write)" if damage == "torn-last-line" else "not JSON"
    assert any(f"{records}: line 2: {why}" in w for w in warnings), warnings
    assert any(f'{work / DONE_FILE}: entry "123": None' in w for w in warnings), warnings
    assert any(f'{work / DONE_FILE}: entry "456"' in w for w in warnings), warnings
    # the database is whole again, the task was found tuned, the library uses its record
    assert records.read_bytes() == good and count_records(work) == 1
    assert len(ms.database.JSONDatabase(work_dir=str(work))) == 1
    assert artifact.tuned
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact.path)), tvm.cpu())
    x = random_input(model, seed=2)
    np.testing.assert_allclose(
        vm["main"](tvm.runtime.tensor(x)).numpy(), run(mod, x), rtol=1e-5, atol=1e-5
    )
    assert json.loads((work / DONE_FILE).read_text()) == {}  # bad entries are not kept
    assert not (work / LOCK_FILE).exists()


def test_records_after_a_dropped_workload_line_are_renumbered(tmp_path, caplog):
    mod = load(synthetic.mlp(sizes=(16, 8)))
    _seed_database(tmp_path, mod, load_target("x86-host"))
    workloads, records = tmp_path / WORKLOAD_FILE, tmp_path / RECORD_FILE
    # a garbage workload line first: the real workload is line 2, its record says index 1
    workloads.write_bytes(b'["1", "not base64"\n' + workloads.read_bytes())
    records.write_bytes(records.read_bytes().replace(b"[0,", b"[1,", 1))
    with caplog.at_level(logging.WARNING, logger="tvm_qmfrg.targets.tune"):
        assert repair_database(tmp_path) == 1
    assert f"{workloads}: line 1: not JSON" in caplog.text
    assert records.read_bytes().startswith(b"[0,")
    assert len(ms.database.JSONDatabase(work_dir=str(tmp_path))) == 1


def test_a_record_only_tvm_can_tell_is_bad_is_dropped_by_the_deep_check(tmp_path, caplog):
    from tvm_qmfrg.targets.tune import _database

    mod = load(synthetic.mlp(sizes=(16, 8)))
    _seed_database(tmp_path, mod, load_target("x86-host"))
    records = tmp_path / RECORD_FILE
    good = records.read_bytes()
    # shaped like a record, but its trace holds an instruction TVM does not know
    (index, (trace, secs, target, args)) = json.loads(good)
    bad = [index, [[[["NoSuchInstruction", [], [], []]], []], secs, target, args]]
    records.write_bytes(good + json.dumps(bad).encode() + b"\n")
    with caplog.at_level(logging.WARNING, logger="tvm_qmfrg.targets.tune"):
        database = _database(tmp_path, model="mlp")
    assert len(database) == 1
    assert f"{records}: line 2: TVM cannot read it" in caplog.text
    assert records.read_bytes() == good


# -- 4. one run per work dir ------------------------------------------------------------------

HOLD = (
    "import sys; from tvm_qmfrg.targets.tune import work_dir_lock\n"
    "with work_dir_lock(sys.argv[1]):\n"
    "    print('held', flush=True); sys.stdin.read()\n"
)


def test_a_second_compile_on_a_held_work_dir_fails_at_once_naming_the_holder(mlp_onnx, tmp_path):
    work = tmp_path / "tune"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(work)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _files(tmp_path)
        out = tmp_path / "m.so"
        proc = _cli(
            "compile", str(mlp_onnx), "--target", "x86-host", "--trials", "4",
            "--work-dir", str(work), "-o", str(out),
        )  # fmt: skip
        line = _one_line_error(proc)
        assert f"another run (pid {holder.pid}) holds the work dir {work}" in line, line
        assert "tuning" in proc.stdout and "task 1/" not in proc.stderr  # nothing was tuned
        assert _files(tmp_path) == before  # no database, no library
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not (work / LOCK_FILE).exists()  # released and removed by its holder


def test_the_work_dir_lock_nests_in_one_thread_and_refuses_another(tmp_path):
    refused = []
    with work_dir_lock(tmp_path, model="m") as held:
        assert held == tmp_path
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        with work_dir_lock(tmp_path, model="m"):  # build() around tune()
            pass
        assert (tmp_path / LOCK_FILE).exists()  # still held by the outer block

        def other():
            try:
                with work_dir_lock(tmp_path, model="m"):
                    pass
            except OptionError as exc:
                refused.append(str(exc))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert refused and f"pid {os.getpid()}" in refused[0]
    assert not (tmp_path / LOCK_FILE).exists()
    # a lock file left by a killed run holds no flock: it does not block the next run
    (tmp_path / LOCK_FILE).write_text("999999\n")
    with work_dir_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not (tmp_path / LOCK_FILE).exists()


# -- 5. the input signature next to the artifact ----------------------------------------------


def test_bench_without_a_signature_or_with_another_builds_is_one_line(mlp_so, tmp_path):
    bare = tmp_path / "bare.so"
    bare.write_bytes(mlp_so.read_bytes())  # copied without its .json
    before = _files(tmp_path)
    line = _one_line_error(_cli("bench", str(bare), "--rpc", "127.0.0.1:1"))
    assert f"artifact {bare}: no input signature bare.so.json" in line
    assert "--input-shape" in line
    # a signature left from another build of the same file name is refused, not trusted
    (tmp_path / "bare.so.json").write_text(
        json.dumps({"artifact": "bare.so", "sha256": "0" * 64, "inputs": []})
    )
    line = _one_line_error(_cli("bench", str(bare), "--rpc", "127.0.0.1:1"))
    assert "written for another build of bare.so" in line
    assert _files(tmp_path) == sorted([*before, "bare.so.json"])


# -- 6. silent boards, missing references, unknown keys ---------------------------------------


def test_bench_against_a_server_that_never_answers_gives_up_at_the_deadline(mlp_so, silent_board):
    host, port = silent_board
    start = time.monotonic()
    proc = _cli("bench", str(mlp_so), "--rpc", f"{host}:{port}", "--timeout", "2")
    elapsed = time.monotonic() - start
    line = _one_line_error(proc)
    assert f"RPC server {host}:{port}: opening a session: no answer within 2 s" in line, line
    assert elapsed < 20  # interpreter start-up plus the 2 s, not a hang


def test_bench_through_a_tracker_that_never_answers_gives_up_at_the_deadline(mlp_so, silent_board):
    host, port = silent_board
    proc = _cli("bench", str(mlp_so), "--rpc", f"{host}:{port}", "--key", "b", "--timeout", "2")
    line = _one_line_error(proc)
    assert f"RPC tracker {host}:{port}: no answer within 2 s" in line, line


def test_bench_with_a_key_no_board_registered_is_one_line_at_once(mlp_so):
    with rpc.local_tracker() as (host, port):
        start = time.monotonic()
        proc = _cli("bench", str(mlp_so), "--rpc", f"{host}:{port}", "--key", "board")
        elapsed = time.monotonic() - start
    line = _one_line_error(proc)
    assert f"RPC tracker {host}:{port}: no board with key 'board' is registered" in line, line
    assert elapsed < 20  # no request queued at the tracker, no retries


def test_bench_with_a_missing_reference_is_one_line(mlp_so, tmp_path):
    missing = tmp_path / "missing.so"
    line = _one_line_error(
        _cli("bench", str(mlp_so), "--rpc", "127.0.0.1:1", "--reference", str(missing))
    )
    assert f"--reference {missing}: no such file" in line
    assert list(tmp_path.iterdir()) == []


def test_bench_timeout_must_be_positive(mlp_so):
    line = _one_line_error(_cli("bench", str(mlp_so), "--rpc", "127.0.0.1:1", "--timeout", "0"))
    assert "--timeout 0 must be > 0" in line


def test_a_deadline_keeps_the_callers_alarm():
    import signal

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(time.monotonic()))
    try:
        # the caller's timer is due after the deadline: re-armed for what is left of it
        start = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(DeviceError, match="slow step: no answer within 0.05 s"):
            with rpc.deadline(0.05, "slow step"):
                time.sleep(2)
        time.sleep(0.8)
        assert len(fired) == 1 and 0.4 < fired[0] - start < 1.2
        # the caller's timer is due first: its handler runs then, and the deadline goes on
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(DeviceError, match="slower step: no answer within 0.3 s"):
            with rpc.deadline(0.3, "slower step"):
                time.sleep(2)
        assert len(fired) == 2
        with rpc.deadline(5, "quick step"):
            pass
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
