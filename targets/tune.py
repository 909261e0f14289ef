"""MetaSchedule tuning for a deployment target, resumable from a JSON database in ``work_dir``.

:func:`tune` legalizes and fuses the module (what ``static_shape_tuning`` does before
tuning), extracts the tuning tasks, and runs MetaSchedule (evolutionary search, XGBoost cost
model) with:

* a ``LocalBuilder`` with :func:`build_candidate` (MetaSchedule's default build without its
  ``import tvm.s_tir.tensor_intrin``: ~28 s in every fresh worker, and the builder starts
  fresh workers for every batch) and, for configs with a cross compiler,
  :func:`export_candidate`, which links each candidate into a ``.so`` here so the board
  needs no compiler (MetaSchedule's default ships a ``.tar`` the board links itself);
* a ``LocalRunner``, or for ``runner.kind = "rpc"`` an ``RPCRunner`` through a tracker
  (``host:port``, key from the config) with one worker per server the tracker knows;
* a persistent ``JSONDatabase`` in ``work_dir``. MetaSchedule itself re-measures new
  candidates for a workload already in its database, so tasks are filtered first: a task
  whose workload has ``trials_per_task`` records, or that a run with at least this
  ``trials_per_task`` marked finished (``tvm_qmfrg-tuned.json``), is skipped; a larger
  ``trials_per_task`` later goes on with it. A run interrupted mid-task keeps every record it
  wrote; the next run skips the finished tasks and re-tunes the others, seeded from the
  database's best records.

Crash safety. MetaSchedule appends one JSON line per workload and per record, so a power cut
can leave a torn last line (and the next append would be glued to it), and a bad copy can
leave garbage; MetaSchedule then refuses the whole database. :func:`repair_database` runs
before every open: it drops each unreadable line (and records of dropped workloads, renumbering
the others) with a warning naming the file and the line, and rewrites the files atomically.
The done-file is read entry by entry: a bad entry (``{"123": null}``) is skipped with a
warning. One run at a time owns a work dir (:func:`work_dir_lock`, an ``flock`` on
``.tvm_qmfrg.lock`` holding the owner's pid): a second one fails at once naming that pid.

:func:`apply_database` then rewrites the module with the best schedules found
(``relax.transform.MetaScheduleApplyDatabase``), and
:func:`~tvm_qmfrg.targets.build.compile_tuned` compiles it.
Progress is logged at INFO per measured batch: task i/n, its name, trials done/budget and the
best latency so far.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tvm_qmfrg.errors import BuildError, DeviceError, OptionError, ToolchainError
from tvm_qmfrg.report import write_atomic

from .config import TargetConfig, load
from .translate import reason, translate_errors

logger = logging.getLogger(__name__)

DONE_FILE = "tvm_qmfrg-tuned.json"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
LOCK_FILE = ".tvm_qmfrg.lock"
MAX_LINE_WARNINGS = 10  # per file; then one line with the count of the others
DEFAULT_BUILD_TIMEOUT = 300.0
DEFAULT_RUN_TIMEOUT = 60.0


def build_candidate(mod, target, _params=None):
    """Builder worker: compile one scheduled candidate (``f_build`` of ``LocalBuilder``).

    MetaSchedule's ``default_build`` minus its ``import tvm.s_tir.tensor_intrin``: candidates
    arrive already tensorized, so the intrinsic registry is not needed here, and the import
    costs ~28 s in each fresh worker (the builder restarts its workers every batch).
    """
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return build(mod, target=target)


def export_candidate(rt_mod, compiler: str, options: tuple[str, ...] = ()) -> str:
    """Builder worker: link a built candidate into a ``.so`` with ``compiler``; its path.

    Used for configs with a cross compiler, so RPC boards load the candidate as is.
    ``options`` are the config's ``compiler_options`` (:func:`~.artifact.link_shared`).
    """
    import tempfile

    from .artifact import cross_fcompile

    path = os.path.join(tempfile.mkdtemp(prefix="tvm_qmfrg-candidate-"), "candidate.so")
    rt_mod.export_library(path, fcompile=cross_fcompile(compiler, options))
    return path


@dataclass(frozen=True)
class TaskStatus:
    """One tuning task: its name, records before/after this run, and whether it was skipped."""

    name: str
    records_before: int
    records_after: int
    skipped: bool
    best_ms: float | None


@dataclass(frozen=True)
class TuneSummary:
    """What :func:`tune` did: per task status, and the database's total records."""

    work_dir: Path
    tasks: tuple[TaskStatus, ...]
    records_before: int
    records_after: int

    @property
    def new_records(self) -> int:
        return self.records_after - self.records_before


def parse_tracker(text: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``; :class:`OptionError` on anything else."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OptionError(f"tracker '{text}' must be HOST:PORT (e.g. 127.0.0.1:9190)")
    return host, int(port)


def bind_static_shapes(mod, bindings: Mapping[str, int] | None = None, *, model: str = "model"):
    """``mod`` with every symbolic dimension of ``main``'s parameters bound to an integer.

    MetaSchedule tunes static shapes only (a symbolic loop extent makes its task sampling
    fail), so a dynamic dimension (an ONNX model's ``batch``) is bound by name from
    ``bindings``, else to 1, the batch of edge inference; the tuned library then takes that
    shape. Unknown names in ``bindings`` are an :class:`OptionError`.
    """
    from tvm import relax

    names = [v.name for v in relax.analysis.defined_symbolic_vars(mod["main"])]
    bindings = dict(bindings or {})
    unknown = sorted(set(bindings) - set(names))
    if unknown:
        have = ", ".join(names) or "none"
        raise OptionError(
            f"{model}: no symbolic dimension named {', '.join(unknown)} (it has: {have})"
        )
    if not names:
        return mod
    values = {n: int(bindings.get(n, 1)) for n in names}
    if any(v < 1 for v in values.values()):
        raise OptionError(f"{model}: shape bindings must be >= 1, got {values}")
    if any(n not in bindings for n in names):
        logger.warning(
            "%s: tuning needs static shapes: binding %s (the tuned library takes these)",
            model,
            ", ".join(f"{n}={values[n]}" for n in names),
        )
    return relax.transform.BindSymbolicVars(values)(mod)


def prepare(mod, target, *, shape_bindings: Mapping[str, int] | None = None, model="model"):
    """Bind static shapes (:func:`bind_static_shapes`), then legalize, fold and fuse ``mod``
    for ``target``: the module tasks are extracted from."""
    import tvm
    from tvm import relax

    mod = bind_static_shapes(mod, shape_bindings, model=model)
    with target:
        return tvm.transform.Sequential(
            [
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                relax.get_pipeline("zero"),
            ]
        )(mod)


# -- the work dir: one run at a time ----------------------------------------------------------

_HELD: dict[str, list] = {}  # realpath of a work dir -> [fd, depth, owning thread]
_HELD_GUARD = threading.Lock()


def _lock_holder(path: Path) -> str:
    """The pid written in the lock file at ``path`` ("unknown" if none is there yet)."""
    for _ in range(20):  # the holder writes its pid right after locking: give it a moment
        try:
            text = path.read_text().strip()
        except OSError:
            text = ""
        if text:
            return text
        time.sleep(0.01)
    return "unknown"


def _acquire(work: Path, model: str) -> int:
    path = work / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OptionError(f"{model}: cannot lock the work dir {work}: {reason(exc)}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OptionError(
                f"{model}: another run (pid {_lock_holder(path)}) holds the work dir {work} "
                f"(lock {LOCK_FILE}); wait for it to finish, or use another work dir"
            ) from None
        except OSError as exc:  # a file system without flock
            os.close(fd)
            raise OptionError(f"{model}: cannot lock the work dir {work}: {reason(exc)}") from exc
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the previous holder removed the file as we opened it: lock the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextlib.contextmanager
def work_dir_lock(work_dir: str | os.PathLike, *, model: str = "model") -> Iterator[Path]:
    """Own ``work_dir`` for the block: an exclusive ``flock`` on its ``.tvm_qmfrg.lock``.

    The file holds this process's pid and is removed on exit. Another process (or another
    thread here) already holding it gets an :class:`OptionError` at once naming that pid, so
    two runs never tune the same tasks into one database. Re-entrant within a thread
    (:func:`~tvm_qmfrg.targets.build.build` holds it around :func:`tune`).
    """
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(work)
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            if held[2] != me:
                raise OptionError(
                    f"{model}: another run in this process (pid {os.getpid()}) holds the "
                    f"work dir {work}; wait for it to finish, or use another work dir"
                )
            held[1] += 1
        else:
            _HELD[key] = held = [_acquire(work, model), 1, me]
    try:
        yield work
    finally:
        with _HELD_GUARD:
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                with contextlib.suppress(OSError):
                    os.unlink(work / LOCK_FILE)  # while still locked: no one else owns it
                os.close(held[0])


# -- the database: repaired before MetaSchedule opens it ---------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _workload_problem(obj) -> str | None:
    """Why ``obj`` (one parsed line of the workload file) is no workload, or None."""
    if not (isinstance(obj, list) and len(obj) == 2 and all(isinstance(v, str) for v in obj)):
        return "not a [hash, module] pair"
    return None


def _record_problem(obj) -> str | None:
    """Why ``obj`` (one parsed line of the record file) is no tuning record, or None."""
    if not (isinstance(obj, list) and len(obj) == 2 and _is_int(obj[0])):
        return "not a [workload index, record] pair"
    rec = obj[1]
    if not (isinstance(rec, list) and len(rec) == 4):
        return "its record is not [trace, run_secs, target, args_info]"
    trace, run_secs, target, args_info = rec
    if not (isinstance(trace, list) and len(trace) == 2) or not all(
        isinstance(t, list) for t in trace
    ):
        return "its trace is not [instructions, decisions]"
    if run_secs is not None and not (
        isinstance(run_secs, list) and all(isinstance(x, (int, float)) for x in run_secs)
    ):
        return "its run_secs are not a list of numbers"
    if target is not None and not isinstance(target, dict):
        return "its target is not a table"
    if args_info is not None and not isinstance(args_info, list):
        return "its args_info is not a list"
    return None


def _parse_lines(path: Path, check) -> tuple[list[tuple[int, object, bytes]], list]:
    """Of a JSON-lines file: ``(line number, parsed, raw line)`` kept, ``(number, why)`` not."""
    try:
        raw_text = path.read_bytes()
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        raise BuildError(f"{path}: cannot read the tuning database: {reason(exc)}") from exc
    lines = raw_text.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    kept, bad = [], []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            bad.append((number, "empty line"))
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append((number, "not UTF-8 text"))
            continue
        except ValueError as exc:
            torn = number == len(lines) and not raw_text.endswith(b"\n")
            bad.append((number, "torn (cut off mid-write)" if torn else f"not JSON ({exc})"))
            continue
        problem = check(obj)
        if problem:
            bad.append((number, problem))
        else:
            kept.append((number, obj, raw))
    return kept, bad


def _warn_dropped(path: Path, dropped: list[tuple[int, str]]) -> None:
    for number, why in dropped[:MAX_LINE_WARNINGS]:
        logger.warning("%s: line %d: %s; skipped (dropped from the database)", path, number, why)
    if len(dropped) > MAX_LINE_WARNINGS:
        logger.warning(
            "%s: %d more unreadable line(s) skipped", path, len(dropped) - MAX_LINE_WARNINGS
        )


def _deep_checks(workloads: list, records: list) -> tuple[set[int], list, list]:
    """What TVM itself cannot parse, of lines that passed the cheap checks.

    Returns the line numbers of both kinds it refused, and ``(line number, why)`` for each.
    """
    from tvm.s_tir import meta_schedule as ms

    refused, bad_wl, bad_rec, parsed = set(), [], [], {}
    for number, obj, _ in workloads:
        try:
            parsed[number - 1] = ms.database.Workload.from_json(obj)
        except Exception as exc:
            refused.add(("w", number))
            bad_wl.append((number, f"TVM cannot read it ({reason(exc)})"))
    for number, (index, rec), _ in records:
        if index not in parsed:
            continue  # its workload is gone: dropped below
        try:
            ms.database.TuningRecord.from_json(rec, parsed[index])
        except Exception as exc:
            refused.add(("r", number))
            bad_rec.append((number, f"TVM cannot read it ({reason(exc)})"))
    return refused, bad_wl, bad_rec


def repair_database(work_dir: str | os.PathLike, *, deep: bool = False) -> int:
    """Drop the unreadable lines of ``work_dir``'s JSON database; the number dropped.

    A line is unreadable when it is empty, torn, not JSON, or not shaped like a workload
    (``[hash, module]``) or a record (``[workload index, [trace, run_secs, target,
    args_info]]``); ``deep=True`` also asks TVM to parse each one (slow: ~5 ms a record; used
    only when MetaSchedule refuses a database that passed the cheap checks). Records of a
    dropped workload go with it, and the indices of the others are renumbered. Each dropped
    line is logged as a warning naming the file and the line; changed files are rewritten
    atomically (the lines kept are written back byte for byte, but for a new index).
    """
    work = Path(work_dir)
    wl_path, rec_path = work / WORKLOAD_FILE, work / RECORD_FILE
    workloads, bad_wl = _parse_lines(wl_path, _workload_problem)
    records, bad_rec = _parse_lines(rec_path, _record_problem)
    wl_lines = len(workloads) + len(bad_wl)
    if deep:
        refused, deep_wl, deep_rec = _deep_checks(workloads, records)
        bad_wl += deep_wl
        bad_rec += deep_rec
        workloads = [w for w in workloads if ("w", w[0]) not in refused]
        records = [r for r in records if ("r", r[0]) not in refused]
    # a record's workload index is the line of its workload, counted from 0
    renumber = {number - 1: new for new, (number, _, _) in enumerate(workloads)}
    kept_records = []
    for number, (index, rec), raw in records:
        if index not in renumber:
            where = f"line {index + 1} of {WORKLOAD_FILE}"
            gone = "is gone" if 0 <= index < wl_lines else "does not exist"
            bad_rec.append((number, f"its workload ({where}) {gone}"))
        elif renumber[index] == index:
            kept_records.append(raw)
        else:
            kept_records.append(json.dumps([renumber[index], rec], separators=(",", ":")).encode())
    if bad_wl:
        _warn_dropped(wl_path, sorted(bad_wl))
        write_atomic(wl_path, b"".join(raw + b"\n" for _, _, raw in workloads))
    if bad_rec or any(old != new for old, new in renumber.items()):
        _warn_dropped(rec_path, sorted(bad_rec))
        write_atomic(rec_path, b"".join(raw + b"\n" for raw in kept_records))
    return len(bad_wl) + len(bad_rec)


def _database(work_dir: Path, *, model: str = "model"):
    """``work_dir``'s JSONDatabase, after :func:`repair_database`."""
    from tvm.s_tir import meta_schedule as ms

    repair_database(work_dir)

    def open_():
        return ms.database.JSONDatabase(work_dir=str(work_dir), module_equality="structural")

    try:
        return open_()
    except Exception as exc:  # a line shaped right that TVM still cannot parse
        logger.warning(
            "%s: MetaSchedule cannot read the database in %s (%s); checking each line",
            model,
            work_dir,
            reason(exc),
        )
    repair_database(work_dir, deep=True)
    with translate_errors(model, f"cannot read the tuning database in {work_dir}", BuildError):
        return open_()


def _records_of(database, mod) -> list:
    if not database.has_workload(mod):
        return []
    workload = database.commit_workload(mod)
    return list(database.get_top_k(workload, 1 << 30))


def _best_ms(records) -> float | None:
    best = None
    for r in records:
        secs = [float(s) for s in (r.run_secs or [])]
        if secs and max(secs) < 1e9:
            ms_ = 1e3 * sum(secs) / len(secs)
            best = ms_ if best is None else min(best, ms_)
    return best


def _workload_key(mod) -> str:
    import tvm_ffi  # 0.27: structural_hash moved from tvm.ir to tvm_ffi

    return str(tvm_ffi.structural_hash(mod))


def _read_done(work_dir: Path) -> dict[str, int]:
    """Finished tasks: workload key -> the trials-per-task budget they finished under.

    A missing file is no finished task. An unreadable file, or a bad entry (a value that is
    not a non-negative integer, ``{"123": null}``), is skipped with a warning naming the file
    (and the key) and dropped from the file: those tasks are then judged by their records in
    the database.
    """
    path = work_dir / DONE_FILE
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("%s: unreadable (%s); skipped", path, reason(exc))
        _write_done(work_dir, {})
        return {}
    try:
        done = json.loads(text)
    except ValueError as exc:
        logger.warning("%s: not JSON (%s); skipped", path, exc)
        _write_done(work_dir, {})
        return {}
    if not isinstance(done, dict):
        logger.warning("%s: not a JSON object of task -> trials; skipped", path)
        _write_done(work_dir, {})
        return {}
    good = {}
    for key, value in done.items():
        if _is_int(value) and value >= 0:
            good[str(key)] = value
        else:
            logger.warning(
                "%s: entry %s: %r is not a trial count; skipped", path, json.dumps(key), value
            )
    if len(good) != len(done):
        _write_done(work_dir, good)
    return good


def _write_done(work_dir: Path, done: dict[str, int]) -> None:
    write_atomic(work_dir / DONE_FILE, json.dumps(dict(sorted(done.items())), indent=0).encode())


def count_records(work_dir: str | os.PathLike) -> int:
    """Tuning records in the JSON database of ``work_dir`` (0 when there is none)."""
    path = Path(work_dir) / RECORD_FILE
    if not path.is_file():
        return 0
    with open(path) as fh:
        return sum(1 for line in fh if line.strip())


@dataclass(frozen=True)
class TuneProgress:
    """One measured batch: task ``task`` of ``tasks``, its trials so far, best latency."""

    task: int
    tasks: int
    name: str
    trials: int
    budget: int
    best_ms: float | None


def _progress_callback(names: list[str], budget: int, before: list[int], report=None):
    from tvm.ir.utils import derived_object  # 0.27: not in meta_schedule.utils
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.done = [0] * len(names)
            self.best = [None] * len(names)

        def apply(
            self, task_scheduler, task_id, measure_candidates, builder_results, runner_results
        ):
            self.done[task_id] += len(measure_candidates)
            failed = 0
            for b, r in zip(builder_results, runner_results):
                secs = [float(s) for s in (r.run_secs or [])]
                if b.error_msg or r.error_msg or not secs:
                    failed += 1
                    continue
                ms_ = 1e3 * sum(secs) / len(secs)
                if self.best[task_id] is None or ms_ < self.best[task_id]:
                    self.best[task_id] = ms_
            best = self.best[task_id]
            logger.info(
                "task %d/%d %s: %d/%d trials%s, best %s",
                task_id + 1,
                len(names),
                names[task_id],
                before[task_id] + self.done[task_id],
                budget,
                f" ({failed} failed in this batch)" if failed else "",
                f"{best:.4f} ms" if best is not None else "none yet",
            )
            if report is not None:
                report(
                    TuneProgress(
                        task_id + 1,
                        len(names),
                        names[task_id],
                        before[task_id] + self.done[task_id],
                        budget,
                        best,
                    )
                )

    return _Progress()


def _runner(config: TargetConfig, tracker: str | None, run_timeout: float):
    from tvm.s_tir import meta_schedule as ms

    from .rpc import registered_keys, server_count, tracker_summary

    if config.runner.kind != "rpc":
        return ms.runner.LocalRunner(timeout_sec=run_timeout)
    if tracker is None:
        raise OptionError(
            f"{config.name}: its runner is RPC (key '{config.runner.key}'): tuning needs a "
            "tracker HOST:PORT"
        )
    host, port = parse_tracker(tracker)
    rpc_config = ms.runner.RPCConfig(
        tracker_host=host,
        tracker_port=port,
        tracker_key=config.runner.key,
        session_timeout_sec=int(run_timeout),
    )
    # the summary over a socket with a timeout (RPCConfig.count_num_servers retries a refused
    # connection for 60 s, then waits without one)
    summary = tracker_summary(host, port, timeout=min(run_timeout, DEFAULT_RUN_TIMEOUT))
    servers = server_count(summary, config.runner.key)
    if servers < 1:
        have = ", ".join(sorted(registered_keys(summary))) or "none"
        raise DeviceError(
            f"{config.name}: the RPC tracker {tracker} has no board registered under key "
            f"'{config.runner.key}' (registered: {have})"
        )
    logger.info("%s: measuring on %d RPC server(s) via %s", config.name, servers, tracker)
    return ms.runner.RPCRunner(rpc_config=rpc_config, max_workers=servers)


def tune(
    mod,
    config: TargetConfig | str | os.PathLike,
    *,
    work_dir: str | os.PathLike,
    trials: int | None = None,
    trials_per_task: int | None = None,
    tracker: str | None = None,
    num_trials_per_iter: int = 64,
    build_timeout: float = DEFAULT_BUILD_TIMEOUT,
    run_timeout: float = DEFAULT_RUN_TIMEOUT,
    seed: int | None = None,
    model: str = "model",
    prepared: bool = False,
    progress: Callable[[TuneProgress], None] | None = None,
    shape_bindings: Mapping[str, int] | None = None,
) -> TuneSummary:
    """Tune ``mod`` for ``config``, records in ``work_dir``'s JSON database (see module doc).

    ``trials`` / ``trials_per_task`` default to the config's tuning section; a budget smaller
    than ``tasks x trials_per_task`` is split evenly, so every task gets tuned. ``tracker``
    (``host:port``) is required when the config's runner is RPC. ``prepared=True`` says
    ``mod`` is already the output of :func:`prepare` (else ``shape_bindings`` go to it).
    ``progress`` is called after every measured batch with a :class:`TuneProgress` (the CLI
    draws its progress bar from it). The run holds ``work_dir`` (:func:`work_dir_lock`).
    """
    config = config if isinstance(config, TargetConfig) else load(config)
    trials = config.tuning.trials if trials is None else int(trials)
    per_task = config.tuning.trials_per_task if trials_per_task is None else int(trials_per_task)
    if trials < 1 or per_task < 1:
        raise OptionError(f"trials ({trials}) and trials per task ({per_task}) must be >= 1")
    per_task = min(per_task, trials)
    try:
        import xgboost  # noqa: F401
    except ImportError as exc:
        raise ToolchainError("tuning needs the xgboost module: pip install xgboost-cpu") from exc

    with work_dir_lock(work_dir, model=model) as work:
        return _tune_locked(
            mod,
            config,
            work,
            trials=trials,
            per_task=per_task,
            tracker=tracker,
            num_trials_per_iter=num_trials_per_iter,
            build_timeout=build_timeout,
            run_timeout=run_timeout,
            seed=seed,
            model=model,
            prepared=prepared,
            progress=progress,
            shape_bindings=shape_bindings,
        )


def _tune_locked(
    mod,
    config: TargetConfig,
    work: Path,
    *,
    trials: int,
    per_task: int,
    tracker,
    num_trials_per_iter,
    build_timeout,
    run_timeout,
    seed,
    model,
    prepared,
    progress,
    shape_bindings,
) -> TuneSummary:
    """:func:`tune`'s work, with ``work`` held and the options checked."""
    from tvm.s_tir import meta_schedule as ms

    target = config.tvm_target()
    runner = _runner(config, tracker, run_timeout)
    with translate_errors(model, f"extracting tuning tasks for {config.name} failed", BuildError):
        legal = (
            mod if prepared else prepare(mod, target, shape_bindings=shape_bindings, model=model)
        )
        extracted = ms.relax_integration.extract_tasks(legal, target)

    # a budget below tasks x per_task would leave the last tasks untuned (and untuned CPU
    # schedules are ~100x slower): split it so that every task gets its share
    configured = per_task
    if 1 <= trials // max(1, len(extracted)) < per_task:
        per_task = trials // len(extracted)
        logger.info(
            "%s: %d trials for %d tasks: %d per task, so that every task is tuned",
            model,
            trials,
            len(extracted),
            per_task,
        )
    database = _database(work, model=model)
    done = _read_done(work)
    total_before = count_records(work)
    statuses: dict[int, dict] = {}
    selected, before = [], []
    for i, task in enumerate(extracted):
        wl = task.dispatched[0]
        records = _records_of(database, wl)
        key = _workload_key(wl)
        skip = done.get(key, 0) >= per_task or len(records) >= per_task
        statuses[i] = {"name": task.task_name, "before": len(records), "skip": skip, "key": key}
        if skip:
            logger.info(
                "%s: task %s already tuned (%d records in %s), skipped",
                model,
                task.task_name,
                len(records),
                work,
            )
        else:
            selected.append(i)
            before.append(len(records))

    if selected:
        remaining = max(per_task - b for b in before)
        names = [extracted[i].task_name for i in selected]
        logger.info(
            "%s: tuning %d of %d task(s) for %s, up to %d trials per task, %d in all",
            model,
            len(selected),
            len(extracted),
            config.name,
            remaining,
            trials,
        )
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            extracted_tasks=[extracted[i] for i in selected], work_dir=str(work), seed=seed
        )
        builder = ms.builder.LocalBuilder(
            f_build=build_candidate,
            f_export=(
                functools.partial(
                    export_candidate,
                    compiler=config.cross_compiler,
                    options=config.compiler_options,
                )
                if config.cross_compiler
                else None
            ),
            timeout_sec=build_timeout,
            max_workers=os.cpu_count(),
        )
        callback = _progress_callback(names, per_task, before, progress)
        callbacks = list(ms.measure_callback.MeasureCallback.create("default")) + [callback]
        with translate_errors(model, f"MetaSchedule tuning for {config.name} failed", BuildError):
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=str(work),
                max_trials_global=trials,
                max_trials_per_task=remaining,
                num_trials_per_iter=min(num_trials_per_iter, remaining),
                builder=builder,
                runner=runner,
                database=database,
                cost_model="xgb",
                measure_callbacks=callbacks,
                task_scheduler="gradient",
            )
        measured = sum(callback.done)
        budget_left = measured < trials
        for j, i in enumerate(selected):
            # a task is finished when it reached its budget, or when the run stopped on its
            # own (every task terminated) rather than on the global trial budget
            # (a split budget's share is not a finished task: a larger budget goes on)
            full = before[j] + callback.done[j] >= configured
            if full or (budget_left and per_task == configured):
                key = statuses[i]["key"]
                done[key] = max(done.get(key, 0), configured)
        _write_done(work, done)

    tasks = []
    for i, task in enumerate(extracted):
        records = _records_of(database, task.dispatched[0])
        st = statuses[i]
        tasks.append(
            TaskStatus(st["name"], st["before"], len(records), st["skip"], _best_ms(records))
        )
    summary = TuneSummary(work, tuple(tasks), total_before, count_records(work))
    logger.info(
        "%s: tuning done: %d task(s), %d skipped, %d new record(s) in %s",
        model,
        len(tasks),
        sum(t.skipped for t in tasks),
        summary.new_records,
        work,
    )
    return summary


def apply_database(
    mod,
    config: TargetConfig | str | os.PathLike,
    work_dir,
    *,
    prepared=False,
    shape_bindings: Mapping[str, int] | None = None,
    model="model",
):
    """``mod`` with the best schedules of ``work_dir``'s database applied.

    The database is repaired first (:func:`repair_database`), like :func:`tune` does, with
    ``work_dir`` held (:func:`work_dir_lock`).
    """
    from tvm import relax

    config = config if isinstance(config, TargetConfig) else load(config)
    target = config.tvm_target()
    legal = mod if prepared else prepare(mod, target, shape_bindings=shape_bindings, model=model)
    with work_dir_lock(work_dir, model=model) as work:
        database = _database(work, model=model)
        with target, database:
            return relax.transform.MetaScheduleApplyDatabase()(legal)
