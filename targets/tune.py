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

:func:`apply_database` then rewrites the module with the best schedules found
(``relax.transform.MetaScheduleApplyDatabase``), and
:func:`~tvm_qmfrg.targets.build.compile_tuned` compiles it.
Progress is logged at INFO per measured batch: task i/n, its name, trials done/budget and the
best latency so far.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from tvm_qmfrg.errors import GraphError, OptionError, QMFRGError, ToolchainError

from .config import TargetConfig, load

logger = logging.getLogger(__name__)

DONE_FILE = "tvm_qmfrg-tuned.json"
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


def export_candidate(rt_mod, compiler: str) -> str:
    """Builder worker: link a built candidate into a ``.so`` with ``compiler``; its path.

    Used for configs with a cross compiler, so RPC boards load the candidate as is.
    """
    import tempfile

    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="tvm_qmfrg-candidate-"), "candidate.so")
    rt_mod.export_library(path, fcompile=cc.cross_compiler(compiler))
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


def _database(work_dir: Path):
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(work_dir=str(work_dir), module_equality="structural")


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
    """Finished tasks: workload key -> the trials-per-task budget they finished under."""
    path = work_dir / DONE_FILE
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(done, dict):
        return {}
    return {str(k): int(v) for k, v in done.items()}


def _write_done(work_dir: Path, done: dict[str, int]) -> None:
    path = work_dir / DONE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(done.items())), indent=0))
    os.replace(tmp, path)


def count_records(work_dir: str | os.PathLike) -> int:
    """Tuning records in the JSON database of ``work_dir`` (0 when there is none)."""
    path = Path(work_dir) / "database_tuning_record.json"
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
    try:
        servers = rpc_config.count_num_servers(allow_missing=True)
    except Exception as exc:  # connection refused, timeout
        raise OptionError(f"{config.name}: cannot reach the RPC tracker {tracker}: {exc}") from exc
    if servers < 1:
        raise OptionError(
            f"{config.name}: the tracker {tracker} has no free server under key "
            f"'{config.runner.key}'"
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
    draws its progress bar from it).
    """
    from tvm.s_tir import meta_schedule as ms

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

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    target = config.tvm_target()
    runner = _runner(config, tracker, run_timeout)
    try:
        legal = (
            mod if prepared else prepare(mod, target, shape_bindings=shape_bindings, model=model)
        )
        extracted = ms.relax_integration.extract_tasks(legal, target)
    except QMFRGError:
        raise
    except Exception as exc:
        raise GraphError(
            f"{model}: extracting tuning tasks for {config.name} failed: {exc}"
        ) from exc

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
    database = _database(work)
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
                functools.partial(export_candidate, compiler=config.cross_compiler)
                if config.cross_compiler
                else None
            ),
            timeout_sec=build_timeout,
            max_workers=os.cpu_count(),
        )
        callback = _progress_callback(names, per_task, before, progress)
        callbacks = list(ms.measure_callback.MeasureCallback.create("default")) + [callback]
        try:
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
        except QMFRGError:
            raise
        except Exception as exc:
            raise GraphError(
                f"{model}: MetaSchedule tuning for {config.name} failed: {exc}"
            ) from exc
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
    """``mod`` with the best schedules of ``work_dir``'s database applied."""
    from tvm import relax

    config = config if isinstance(config, TargetConfig) else load(config)
    target = config.tvm_target()
    legal = mod if prepared else prepare(mod, target, shape_bindings=shape_bindings, model=model)
    with target:
        return relax.transform.MetaScheduleApplyDatabase(str(work_dir))(legal)
