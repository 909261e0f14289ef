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

Nothing waits forever. Through a tracker, its summary is read first (a plain socket with the
timeout) and a key no board registered under fails at once, instead of a request the tracker
would queue for good. Every step on the board (connect, upload, load, the first run) must
answer within ``timeout`` seconds, and the timing within ``timeout`` plus its expected
duration; else :class:`~tvm_qmfrg.errors.DeviceError`. TVM's RPC client blocks in C++
sockets that have no timeout, but it checks for signals while it waits, so the deadline is a
``SIGALRM`` timer (:func:`deadline`); Python delivers signals to the main thread only, so
called from another thread, only the tracker check has a timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tvm_qmfrg.errors import DeviceError, ModelError, OptionError

from .translate import reason, translate_errors

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
DEFAULT_TIMEOUT = 60.0


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


class _Deadline(BaseException):
    """Raised by :func:`deadline`'s timer; not an ``Exception``, so that no retry loop in
    TVM's RPC client (``except RuntimeError``/``OSError``) swallows it."""


@contextlib.contextmanager
def deadline(seconds: float | None, what: str):
    """Raise :class:`DeviceError` ``"<what>: no answer within N s"`` if the block takes longer.

    A ``SIGALRM`` timer, in the main thread only (elsewhere the block runs without one). A
    timer the caller had set still fires on time (its handler runs, if it comes first) or is
    re-armed afterwards for what is left of it.
    """
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if seconds is None or seconds <= 0 or not usable:
        if seconds and not usable:
            logger.debug("%s: no deadline outside the main thread", what)
        yield
        return
    token = _Deadline()
    outer, _ = signal.getitimer(signal.ITIMER_REAL)  # the caller's timer, if any: s left
    state = {"armed": True, "outer_first": bool(outer) and outer <= seconds}
    start = time.monotonic()

    def on_alarm(signum, frame):
        if not state["armed"]:
            return
        if state["outer_first"]:  # the caller's alarm: ours goes on for what is left of it
            state["outer_first"] = False
            left = seconds - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, left))
            if callable(previous):
                previous(signum, frame)
            return
        raise token

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, outer if state["outer_first"] else seconds)
    try:
        yield
    except _Deadline as exc:
        if exc is not token:
            raise
        raise DeviceError(f"{what}: no answer within {seconds:g} s") from None
    finally:
        state["armed"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
        if outer > seconds:  # the caller's timer is due after ours: re-arm what is left
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer - (time.monotonic() - start)))


def tracker_summary(host: str, port: int, *, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """The summary of the RPC tracker at ``host:port`` (its queues and servers).

    Read over a plain socket with ``timeout`` (``tvm.rpc.connect_tracker`` retries a refused
    connection for 60 s and then waits without a timeout); :class:`DeviceError` when the
    tracker is unreachable, does not answer in time, or is not a TVM RPC tracker.
    """
    from tvm.rpc import base

    where = f"RPC tracker {host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            (magic,) = struct.unpack("<i", base.recvall(sock, 4))
            if magic != base.RPC_TRACKER_MAGIC:
                raise DeviceError(f"{where}: not a TVM RPC tracker (it answered {magic:#x})")
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            value = base.recvjson(sock)
    except TimeoutError as exc:
        raise DeviceError(f"{where}: no answer within {timeout:g} s") from exc
    except (OSError, ValueError, struct.error) as exc:
        raise DeviceError(f"{where}: cannot read its summary: {reason(exc)}") from exc
    if not (isinstance(value, list) and value and value[0] == base.TrackerCode.SUCCESS):
        raise DeviceError(f"{where}: unexpected answer to a summary request: {value!r:.100}")
    return value[1] if len(value) > 1 and isinstance(value[1], dict) else {}


def registered_keys(summary: dict) -> set[str]:
    """Keys with at least one server registered, from a tracker's :func:`tracker_summary`."""
    keys = {
        str(k)
        for k, q in (summary.get("queue_info") or {}).items()
        if isinstance(q, dict) and (q.get("free", 0) + q.get("pending", 0)) > 0
    }
    for info in summary.get("server_info") or []:
        key = str(info.get("key", "")) if isinstance(info, dict) else ""
        if key.startswith("server:"):
            keys.add(key[len("server:") :])
    return keys


def server_count(summary: dict, key: str) -> int:
    """How many servers registered under ``key`` (free or busy), from a tracker's summary."""
    return sum(
        1
        for info in summary.get("server_info") or []
        if isinstance(info, dict) and str(info.get("key", "")) == f"server:{key}"
    )


def _where(host: str, port: int, key: str | None) -> str:
    return f"RPC tracker {host}:{port} (key '{key}')" if key else f"RPC server {host}:{port}"


def connect(host: str, port: int, key: str | None = None, *, timeout: float = DEFAULT_TIMEOUT):
    """An RPC session: to the server at ``host:port``, or via the tracker there if ``key``.

    Through a tracker, a ``key`` no server registered under is a :class:`DeviceError` at
    once; so is an unreachable server or tracker, or one that does not answer within
    ``timeout`` seconds (in the main thread: see :func:`deadline`).
    """
    from tvm import rpc

    where = _where(host, port, key)
    if key:
        keys = registered_keys(tracker_summary(host, port, timeout=timeout))
        if key not in keys:
            have = ", ".join(sorted(keys)) or "none"
            raise DeviceError(
                f"RPC tracker {host}:{port}: no board with key '{key}' is registered "
                f"(registered: {have})"
            )
    with (
        translate_errors(where, "cannot open an RPC session", DeviceError),
        deadline(timeout, where + ": opening a session"),
    ):
        if key:
            tracker = rpc.connect_tracker(host, port)
            return tracker.request(key, priority=1, session_timeout=0, max_retry=3)
        return rpc.connect(host, port)


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

    if not Path(artifact_path).is_file():
        raise ModelError(f"artifact {artifact_path}: no such file")
    # TVM raises RuntimeError/TVMError on a shape or dtype mismatch
    with translate_errors(f"artifact {artifact_path}", "running it here failed", ModelError):
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact_path)), tvm.cpu())
        out = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
    return _first_numpy(out)


def _first_numpy(out) -> np.ndarray:
    if hasattr(out, "numpy"):
        return out.numpy()
    return _first_numpy(out[0])  # a tuple of outputs: the first one


def default_inputs(
    shapes: dict[str, tuple[int, ...]],
    seed: int = 0,
    dtypes: dict[str, str] | None = None,
) -> list[np.ndarray]:
    """Random inputs of ``shapes`` (in order): float32 unless ``dtypes`` names another.

    Floats are standard normal; integers are 0 or 1 (valid token ids and masks); bools random.
    """
    rng = np.random.default_rng(seed)
    out = []
    for name, shape in shapes.items():
        dtype = np.dtype((dtypes or {}).get(name, "float32"))
        if dtype.kind == "f":
            out.append(rng.standard_normal(shape).astype(dtype))
        elif dtype.kind in "iu":
            out.append(rng.integers(0, 2, size=shape).astype(dtype))
        elif dtype.kind == "b":
            out.append(rng.integers(0, 2, size=shape).astype(bool))
        else:
            raise OptionError(f"input '{name}': no random data for dtype {dtype}")
    return out


def signature_inputs(artifact_path, seed: int = 0) -> tuple[dict, list[np.ndarray]]:
    """Shapes and random inputs from the signature written next to the artifact at build.

    :class:`ModelError` when there is none or a dimension is symbolic (then give shapes).
    """
    from .artifact import read_signature

    signature = read_signature(artifact_path)
    for entry in signature:
        symbolic = [d for d in entry["shape"] if not isinstance(d, int)]
        if symbolic:
            raise ModelError(
                f"artifact {artifact_path}: input '{entry['name']}' has symbolic dimension(s) "
                f"{', '.join(map(str, symbolic))}; give its shape with --input-shape"
            )
    shapes = {e["name"]: tuple(e["shape"]) for e in signature}
    dtypes = {e["name"]: e["dtype"] for e in signature}
    return shapes, default_inputs(shapes, seed, dtypes)


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
    timeout: float = DEFAULT_TIMEOUT,
) -> BenchResult:
    """Upload ``artifact_path``, run ``main(*inputs)`` remotely, time it, check its output.

    ``reference`` defaults to running the artifact locally when it is a ``.so`` for this
    machine; otherwise the output is not checked (``output_matches`` is ``None``).
    ``timeout``: seconds each step on the board may take (see the module doc); an
    unreachable or silent board, or an unregistered ``key``, is a :class:`DeviceError`.
    """
    import tvm
    from tvm import relax

    path = Path(artifact_path)
    if not path.is_file():
        raise ModelError(f"artifact {path}: no such file")
    if repeat < 1 or number < 1:
        raise OptionError(f"repeat ({repeat}) and number ({number}) must be >= 1")
    if not timeout > 0:
        raise OptionError(f"timeout ({timeout}) must be > 0 seconds")
    if reference is None and is_host_artifact(path):
        reference = local_outputs(path, inputs)

    where = _where(host, port, key)
    model = f"artifact {path}"
    remote = connect(host, port, key, timeout=timeout)
    silent = False
    try:
        with (
            translate_errors(model, f"uploading it to the {where} failed", DeviceError),
            deadline(timeout, f"{where}: uploading {path.name}"),
        ):
            remote.upload(str(path))
        with translate_errors(model, "running it over RPC failed", ModelError):
            with deadline(timeout, f"{where}: loading {path.name}"):
                lib = remote.load_module(path.name)
                dev = remote.cpu()
                vm = relax.VirtualMachine(lib, dev)
                args = [tvm.runtime.tensor(x, dev) for x in inputs]
            with deadline(timeout, f"{where}: running main"):
                start = time.perf_counter()
                got = _first_numpy(vm["main"](*args))
                once = time.perf_counter() - start
            # the timing takes about number x repeat runs: allow twice that on top
            with deadline(timeout + 2 * once * number * repeat, f"{where}: timing main"):
                timer = vm.time_evaluator("main", dev, number=number, repeat=repeat)
                results = np.asarray(timer(*args).results) * 1e3
    except DeviceError:
        silent = True
        raise
    finally:
        if not silent:  # a board that stopped answering would not answer this either
            with contextlib.suppress(Exception):
                with deadline(min(timeout, 10.0), f"{where}: removing {path.name}"):
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
    return key in registered_keys(tracker_summary(*tracker, timeout=10.0))


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
