"""TVM and OS errors turned into one-line QMFRGErrors, in one place.

TVM raises many types for one failure (``TVMError``, ``InternalError``, ``ValueError``,
``RuntimeError``) with messages of many lines (C++ backtraces, RPC framing); sockets raise
``OSError``. Code in :mod:`tvm_qmfrg.targets` wraps each call into TVM, or onto the network,
in :func:`translate_errors`, which re-raises anything but a ``QMFRGError`` as the given class
with a message ``"<model>: <what>: <reason>"`` on one line (:func:`reason`); the original
exception stays chained as its ``__cause__``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tvm_qmfrg.errors import QMFRGError

MAX_REASON = 300  # characters of the underlying message kept in a one-line error


_FRAMING = ("Traceback (most recent call last)", "RPCError: Error caught from RPC call:")


def reason(exc: BaseException) -> str:
    """The telling line of ``exc``'s message, at most 300 characters.

    That is its first non-empty line after TVM's framing (a backtrace header, the RPC
    client's "Error caught from RPC call:"): TVM puts its headline first and the offending
    IR after it. An ``OSError`` gives its strerror; an empty message the exception's type.
    """
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        while len(lines) > 1 and lines[0].startswith(_FRAMING):
            lines.pop(0)
        text = lines[0] if lines else type(exc).__name__
    if len(text) > MAX_REASON:
        text = text[: MAX_REASON - 3] + "..."
    return text


@contextlib.contextmanager
def translate_errors(model: str, what: str, cls: type[QMFRGError]) -> Iterator[None]:
    """Re-raise any ``Exception`` in the block as ``cls("<model>: <what>: <reason>")``.

    A :class:`QMFRGError` passes through unchanged (it already has its one line); so does a
    ``BaseException`` that is no ``Exception`` (``KeyboardInterrupt``, the CLI's SIGTERM, a
    deadline).
    """
    try:
        yield
    except QMFRGError:
        raise
    except Exception as exc:
        raise cls(f"{model}: {what}: {reason(exc)}") from exc
