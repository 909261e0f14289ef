"""Run and time an exported artifact on a board over TVM RPC.

:func:`bench` uploads the artifact (``remote.upload``), loads it on the other side
(``remote.load_module``; a ``.tar`` is linked there by the board's compiler), runs ``main``
on ``relax.VirtualMachine(lib, remote.cpu())``, times it with ``vm.time_evaluator`` and
compares the output with a reference computed here (passed in, or by loading the same
artifact locally when it was built for this machine).

Connection: directly to a server (``host:port``) or through a tracker (``host:port`` plus the
``key`` the board registered under). :func:`local_server` and :func:`local_tracker` start a
server and a tracker on 127.0.0.1 for tests and tutorials (never 0.0.0.0) and stop them on
exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tvm_qmfrg.errors import ModelError, OptionError, QMFRGError

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class BenchResult:
    """Latency of ``main`` on the remote device over ``repeats`` repeats, in milliseconds.

    ``output_matches`` is ``None`` when there was no reference to compare with.
    """

    mean_ms: float
    median_ms: float
    std_ms: float
    repeats: int
    output_matches: bool | None
    max_abs_error: float | None = None


def connect(host: str, port: int, key: str | None = None, *, timeout: float = 60.0):
    """An RPC session: to the server at ``host:port``, or via the tracker there if ``key``."""
    from tvm import rpc

    try:
        if key:
            tracker = rpc.connect_tracker(host, port)
            return tracker.request(key, priority=1, session_timeout=0, max_retry=3)
        return rpc.connect(host, port)
    except Exception as exc:  # TVMError / RuntimeError / OSError, connection refused etc.
        where = f"tracker {host}:{port} (key '{key}')" if key else f"RPC server {host}:{port}"
        raise OptionError(f"cannot open an RPC session with the {where}: {exc}") from exc


def is_host_artifact(path: Path) -> bool:
    """Whether ``path`` is a shared library for this machine's architecture."""
    import platform

    if path.suffix != ".so":
        return False
    raw = path.read_bytes()[:20]
    if raw[:4] != b"\x7fELF":
        return False
    machine = int.from_bytes(raw[18:20], "little")
    return {"x86_64": 62, "aarch64": 183}.get(platform.machine()) == machine


def local_outputs(artifact_path, inputs: list[np.ndarray]) -> np.ndarray:
    """Run the artifact here (it must be built for this machine); returns ``main``'s output."""
    import tvm
    from tvm import relax

    try:
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact_path)), tvm.cpu())
        out = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
    except Exception as exc:  # TVM raises RuntimeError/TVMError on a shape or dtype mismatch
        raise ModelError(
            f"artifact {artifact_path}: running it here failed: {_reason(exc)}"
        ) from exc
    return _first_numpy(out)


def _reason(exc: Exception) -> str:
    """The last line of a TVM error (its check message; earlier lines are RPC framing)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _first_numpy(out) -> np.ndarray:
    if hasattr(out, "numpy"):
        return out.numpy()
    return _first_numpy(out[0])  # a tuple of outputs: the first one


def default_inputs(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> list[np.ndarray]:
    """Random float32 inputs of ``shapes`` (in order)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes.values()]


def bench(
    artifact_path: str | os.PathLike,
    host: str,
    port: int,
    key: str | None = None,
    *,
    inputs: list[np.ndarray],
    reference: np.ndarray | None = None,
    repeat: int = 10,
    number: int = 10,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> BenchResult:
    """Upload ``artifact_path``, run ``main(*inputs)`` remotely, time it, check its output.

    ``reference`` defaults to running the artifact locally when it is a ``.so`` for this
    machine; otherwise the output is not checked (``output_matches`` is ``None``).
    """
    import tvm
    from tvm import relax

    path = Path(artifact_path)
    if not path.is_file():
        raise ModelError(f"artifact {path}: no such file")
    if repeat < 1 or number < 1:
        raise OptionError(f"repeat ({repeat}) and number ({number}) must be >= 1")
    if reference is None and is_host_artifact(path):
        reference = local_outputs(path, inputs)

    remote = connect(host, port, key)
    try:
        remote.upload(str(path))
        lib = remote.load_module(path.name)
        dev = remote.cpu()
        vm = relax.VirtualMachine(lib, dev)
        args = [tvm.runtime.tensor(x, dev) for x in inputs]
        got = _first_numpy(vm["main"](*args))
        timer = vm.time_evaluator("main", dev, number=number, repeat=repeat)
        results = np.asarray(timer(*args).results) * 1e3
    except QMFRGError:
        raise
    except Exception as exc:
        raise ModelError(f"artifact {path}: running it over RPC failed: {_reason(exc)}") from exc
    finally:
        with contextlib.suppress(Exception):
            remote.remove(path.name)

    matches, err = None, None
    if reference is not None:
        reference = np.asarray(reference)
        if got.shape != reference.shape:
            matches = False
        else:
            err = float(np.max(np.abs(got - reference))) if got.size else 0.0
            matches = bool(np.allclose(got, reference, rtol=rtol, atol=atol))
    result = BenchResult(
        mean_ms=float(results.mean()),
        median_ms=float(np.median(results)),
        std_ms=float(results.std()),
        repeats=int(results.size),
        output_matches=matches,
        max_abs_error=err,
    )
    logger.info("%s over RPC %s:%d: %s", path.name, host, port, result)
    return result


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except Exception:  # not up yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.1)


def is_registered(tracker: tuple[str, int], key: str) -> bool:
    """Whether a server under ``key`` is registered with the tracker at ``tracker``."""
    from tvm import rpc

    summary = rpc.connect_tracker(*tracker).summary()
    return any(
        k == key and (q.get("free", 0) + q.get("pending", 0)) > 0
        for k, q in summary.get("queue_info", {}).items()
    ) or any(key in str(s.get("key", "")) for s in summary.get("server_info", []))


@contextlib.contextmanager
def local_tracker(port: int = 9190, port_end: int = 9290, *, timeout: float = 30.0):
    """A ``tvm.rpc.tracker.Tracker`` on 127.0.0.1; yields ``(host, port)``, stopped on exit."""
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host=LOCALHOST, port=port, port_end=port_end, silent=True)
    try:
        _wait_for(
            lambda: rpc.connect_tracker(LOCALHOST, tracker.port).summary() is not None,
            timeout,
            "RPC tracker",
        )
        yield LOCALHOST, tracker.port
    finally:
        tracker.terminate()


@contextlib.contextmanager
def local_server(
    port: int = 9091,
    port_end: int = 9199,
    *,
    tracker: tuple[str, int] | None = None,
    key: str = "",
    timeout: float = 30.0,
):
    """A ``tvm.rpc.Server`` on 127.0.0.1 (registered with ``tracker`` under ``key`` if given).

    Yields ``(host, port)``; the server process is killed on exit.
    """
    from tvm import rpc

    server = rpc.Server(
        host=LOCALHOST,
        port=port,
        port_end=port_end,
        tracker_addr=tracker,
        key=key,
        custom_addr=LOCALHOST if tracker else None,
        silent=True,
    )
    try:
        if tracker is not None:
            _wait_for(lambda: is_registered(tracker, key), timeout, f"RPC server '{key}'")
        yield LOCALHOST, server.port
    finally:
        server.terminate()
