"""Human- and machine-readable output: aligned text tables and atomic JSON files."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence

from .analysis import ModelAnalysis
from .errors import OptionError


def _stale_temps(folder: str, base: str) -> None:
    """Remove temp files of ``base`` left by writers that no longer run (a SIGKILL)."""
    prefix = f".{base}.tmp-"
    for entry in os.listdir(folder):
        if not entry.startswith(prefix):
            continue
        pid = entry[len(prefix) :].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(folder, entry))
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename.

    A crash or error leaves either the old file or none, never a partial one. The temp file
    is named after its target and this process (``.NAME.tmp-PID-XXXX``); it is removed on
    any exception (the CLI turns SIGTERM into one), and temp files of the same target left
    by a killed process are removed by the next write.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    _stale_temps(folder, base)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.tmp-{os.getpid()}-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Raise :class:`OptionError` now if ``path`` could not be written later.

    ``what`` names the option (``-o``). Checks that ``path`` is not a directory, that its
    nearest existing ancestor is a directory, and that a file can be created there.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OptionError(f"{what} {path}: is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise OptionError(f"{what} {path}: {probe} is a file, not a directory")
    if probe != folder:
        return  # write_atomic creates the missing folders under a writable one
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OptionError(f"{what} {path}: cannot write in {folder} ({exc.strerror})") from exc


def write_json(path: str | os.PathLike, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned text columns, numbers right-aligned, separated by two spaces."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [
        all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in cells])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def analysis_table(analysis: ModelAnalysis) -> str:
    """The per-operator table printed by ``tvm-qmfrg analyze``."""
    headers = [
        "operator",
        "kind",
        "shape",
        "eff.rank",
        "stable",
        "nearest (FS)",
        "d_FS",
        "nearest (W2)",
        "W2",
        f"pairs<={analysis.epsilon:g}",
    ]
    rows = []
    for op in analysis.operators:
        rows.append(
            [
                op.name,
                op.kind if op.groups == 1 else f"{op.kind}/g{op.groups}",
                "x".join(map(str, op.shape)),
                op.effective_rank,
                op.stable_rank,
                op.nearest_fs,
                op.fs_distance,
                op.nearest_w2,
                op.w2_distance,
                f"{op.close_pairs}/{op.channel_pairs}",
            ]
        )
    return format_table(headers, rows)
