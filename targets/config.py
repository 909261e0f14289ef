"""Per-target deployment configs: one TOML file per board or GPU, validated on load.

A config names the TVM target (a tag such as ``arm/rk3399`` or a target dict) and its host,
the compiler that links the exported library, the channel multiple the pruning pass should
round to on that hardware, tuning defaults, the runner that measures candidates (local, or an
RPC key) and the artifact format. The shipped files live next to this module; users add their
own by passing a path to :func:`load`::

    description = "..."          # one line
    round_to = 4                 # channel multiple for QMFRGPrune(round_to=...)
    format = "so"                # "so" (linked shared library) or "tar" (objects)
    cross_compiler = "aarch64-linux-gnu-g++"   # or "none": this machine's compiler; a
                                               # command line, split like a shell does
                                               # ("g++ -O2", "zig c++ -target ...")

    [target]                     # a TVM target dict; `tag` picks a TVM tag, other keys
    tag = "arm/rk3399"           # override it. mcpu/num-cores may be "auto" (this machine)

    [host]                       # optional; required for GPU targets whose tag has none
    kind = "llvm"
    mtriple = "aarch64-linux-gnu"

    [tuning]
    trials = 1000
    trials_per_task = 64

    [runner]
    kind = "rpc"                 # or "local"
    key = "rk3399"               # RPC tracker key (rpc only)

Every problem (unknown or missing key, wrong type, unknown TVM tag or option, invalid LLVM
CPU, a ``cross_compiler`` with an unbalanced quote) raises
:class:`~tvm_qmfrg.errors.OptionError` naming the file and the key; a file that is not UTF-8
or not TOML raises one naming the file (and the line TOML stopped at).
"""

from __future__ import annotations

import logging
import os
import shlex
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from tvm_qmfrg.errors import OptionError

from .translate import translate_errors

logger = logging.getLogger(__name__)

FORMATS = ("so", "tar")
RUNNERS = ("local", "rpc")
AUTO = "auto"
NO_COMPILER = "none"
CPU_KINDS = ("llvm", "c")

_TOP_KEYS = {
    "description": str,
    "round_to": int,
    "format": str,
    "cross_compiler": str,
    "target": dict,
    "host": dict,
    "tuning": dict,
    "runner": dict,
}
_OPTIONAL_TOP = {"host"}
_TUNING_KEYS = {"trials": int, "trials_per_task": int}
_RUNNER_KEYS = {"kind": str, "key": str}
_AUTO_KEYS = ("mcpu", "num-cores")


@dataclass(frozen=True)
class Tuning:
    """MetaSchedule defaults: total trials and the cap per tuning task."""

    trials: int
    trials_per_task: int


@dataclass(frozen=True)
class Runner:
    """Where tuning candidates run: ``local`` or ``rpc`` with a tracker ``key``."""

    kind: str
    key: str | None = None


def _freeze(value):
    if isinstance(value, Mapping):
        return types.MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value):
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class TargetConfig:
    """One deployment target, as loaded and validated from its TOML file.

    ``target`` and ``host`` are read-only TVM target dicts with ``"auto"`` values already
    resolved; ``host`` is ``None`` when the target is its own host (CPU targets) or its tag
    carries one. ``cross_compiler`` is the compiler program, ``None`` for this machine's
    default compiler; ``compiler_options`` are the words that followed it in the TOML value
    (``"g++ -O2"`` -> ``"g++"``, ``("-O2",)``), put right after it on every link
    (:func:`~tvm_qmfrg.targets.artifact.link_shared`).
    """

    name: str
    description: str
    target: Mapping[str, Any] = field(hash=False)
    host: Mapping[str, Any] | None = field(hash=False)
    cross_compiler: str | None
    round_to: int
    tuning: Tuning
    runner: Runner
    format: str
    source: Path | None = field(default=None, compare=False)
    compiler_options: tuple[str, ...] = ()

    def tvm_target(self):
        """The :class:`tvm.target.Target` (with host) this config compiles for."""
        import tvm

        host = _thaw(self.host) if self.host is not None else None
        return tvm.target.Target(_thaw(self.target), host=host)

    @property
    def kind(self) -> str:
        """TVM target kind: ``llvm``, ``cuda``, ``opencl``, ..."""
        return self.tvm_target().kind.name

    @property
    def is_gpu(self) -> bool:
        return "gpu" in list(self.tvm_target().keys)


def _shipped_dir():
    return resources.files(__package__)


def available() -> list[str]:
    """Names of the shipped target configs (file stems), sorted."""
    return sorted(
        p.name[: -len(".toml")] for p in _shipped_dir().iterdir() if p.name.endswith(".toml")
    )


def _resolve(name_or_path: str | os.PathLike) -> Path:
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or text.endswith(".toml") or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise OptionError(f"target config {text}: no such file")
        return path
    shipped = _shipped_dir().joinpath(f"{text}.toml")
    if not shipped.is_file():
        raise OptionError(
            f"unknown target '{text}'; shipped targets: {', '.join(available())} "
            "(or pass the path of a .toml file)"
        )
    return Path(str(shipped))


def _type_name(t) -> str:
    return {str: "a string", int: "an integer", dict: "a table"}.get(t, t.__name__)


def _check_table(path: Path, prefix: str, table: dict, spec: dict, optional=()) -> None:
    unknown = sorted(set(table) - set(spec))
    if unknown:
        keys = ", ".join(f"'{prefix}{k}'" for k in unknown)
        raise OptionError(
            f"{path}: unknown key {keys}; allowed: {', '.join(prefix + k for k in spec)}"
        )
    for key, typ in spec.items():
        if key not in table:
            if key in optional:
                continue
            raise OptionError(f"{path}: missing key '{prefix}{key}'")
        value = table[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise OptionError(
                f"{path}: key '{prefix}{key}' must be {_type_name(typ)}, "
                f"got {type(value).__name__} {value!r}"
            )


def _positive(path: Path, key: str, value: int) -> int:
    if value < 1:
        raise OptionError(f"{path}: key '{key}' must be a positive integer, got {value}")
    return value


def _resolve_auto(path: Path, table_name: str, spec: dict) -> dict:
    """Replace ``"auto"`` in ``mcpu`` / ``num-cores`` by this machine's values."""
    out = dict(spec)
    for key, value in spec.items():
        if value == AUTO and key not in _AUTO_KEYS:
            raise OptionError(
                f"{path}: key '{table_name}.{key}': \"auto\" is only allowed for "
                f"{' and '.join(_AUTO_KEYS)}"
            )
    if not any(out.get(k) == AUTO for k in _AUTO_KEYS):
        return out
    if out.get("kind") != "llvm":
        raise OptionError(
            f'{path}: key \'{table_name}\': "auto" mcpu/num-cores needs kind = "llvm" '
            "(it describes this machine's CPU)"
        )
    if out.get("mcpu") == AUTO:
        from tvm.target import codegen

        out["mcpu"] = str(codegen.llvm_get_system_cpu())
        logger.debug("%s: %s.mcpu auto -> %s", path, table_name, out["mcpu"])
    if out.get("num-cores") == AUTO:
        out["num-cores"] = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
        logger.debug("%s: %s.num-cores auto -> %s", path, table_name, out["num-cores"])
    return out


def _check_target_spec(path: Path, table_name: str, spec: dict) -> None:
    """Tag known, ``kind`` or ``tag`` present (TVM checks the remaining options)."""
    import tvm

    if "tag" in spec:
        tag = spec["tag"]
        if not isinstance(tag, str):
            raise OptionError(f"{path}: key '{table_name}.tag' must be a string, got {tag!r}")
        if tag not in tvm.target.list_tags():
            raise OptionError(
                f"{path}: key '{table_name}.tag': unknown TVM target tag '{tag}' "
                "(tvm.target.list_tags() lists the known ones)"
            )
    elif "kind" not in spec:
        raise OptionError(f"{path}: key '{table_name}' needs 'kind' or 'tag'")
    if "host" in spec:
        raise OptionError(f"{path}: key '{table_name}.host': put the host in a [host] table")


def _check_llvm_cpu(path: Path, table_name: str, spec: dict) -> None:
    """An invalid ``mcpu`` is an error (TVM only logs it and falls back to generic).

    Checked on the spec, before TVM sees it, with the triple of the spec, of its tag, or of
    this machine.
    """
    import tvm
    from tvm.target import codegen

    cpu = spec.get("mcpu")
    if cpu is None:
        return
    if not isinstance(cpu, str):
        raise OptionError(f"{path}: key '{table_name}.mcpu' must be a string, got {cpu!r}")
    kind, triple = spec.get("kind"), spec.get("mtriple")
    if "tag" in spec:
        tagged = tvm.target.list_tags()[spec["tag"]]
        kind = kind or tagged.kind.name
        triple = triple or tagged.attrs.get("mtriple")
    if kind != "llvm":
        return
    triple = str(triple or codegen.llvm_get_system_triple())
    if not codegen.llvm_is_valid_cpu(cpu, triple):
        raise OptionError(f"{path}: key '{table_name}.mcpu': LLVM has no CPU '{cpu}' for {triple}")


def _machine(triple: str) -> str:
    return triple.split("-", 1)[0]


def _check_linkable(path: Path, target, fmt: str, cross_compiler: str | None) -> None:
    """A ``.so`` for another architecture needs a cross compiler."""
    from tvm.target import codegen

    if fmt != "so" or cross_compiler is not None:
        return
    code = target.host if target.host is not None else target
    triple = str(code.attrs.get("mtriple", "") or "")
    system = str(codegen.llvm_get_system_triple())
    if triple and _machine(triple) != _machine(system):
        raise OptionError(
            f"{path}: key 'cross_compiler': format \"so\" for {triple} code needs a cross "
            f'compiler (this machine is {_machine(system)}), or use format = "tar"'
        )


def _build_target(path: Path, target: dict, host: dict | None):
    import tvm

    if host is not None and host.get("kind", "llvm") not in CPU_KINDS:
        raise OptionError(
            f"{path}: key 'host.kind': a host must be a CPU target (llvm or c), "
            f"got '{host['kind']}'"
        )
    # TVM raises ValueError / TVMError naming the offending option
    with translate_errors(str(path), "key 'target': TVM rejects it", OptionError):
        tgt = tvm.target.Target(target)
    if host is not None:
        with translate_errors(str(path), "key 'host': TVM rejects it", OptionError):
            host_tgt = tvm.target.Target(host)
        if host_tgt.kind.name not in CPU_KINDS:  # a tagged host
            raise OptionError(
                f"{path}: key 'host.kind': a host must be a CPU target (llvm or c), "
                f"got '{host_tgt.kind.name}'"
            )
        tgt = tvm.target.Target(target, host=host)
    if tgt.kind.name not in CPU_KINDS and tgt.host is None:
        raise OptionError(
            f"{path}: missing key 'host': a {tgt.kind.name} target needs a [host] table "
            '(e.g. kind = "llvm", mtriple = "aarch64-linux-gnu")'
        )
    return tgt


def _read_toml(path: Path) -> dict:
    """The TOML table of ``path``; one-line :class:`OptionError` naming it if unreadable."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise OptionError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise OptionError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line})"
        ) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        first = str(exc).splitlines()[0] if str(exc).strip() else "syntax error"
        raise OptionError(f"{path}: not valid TOML: {first}") from exc


def _split_compiler(path: Path, value: str) -> tuple[str | None, tuple[str, ...]]:
    """``cross_compiler`` -> (program, options), split like a shell command line."""
    text = value.strip()
    if not text:
        raise OptionError(
            f"{path}: key 'cross_compiler' is empty; write \"{NO_COMPILER}\" to use this "
            "machine's compiler"
        )
    if text == NO_COMPILER:
        return None, ()
    try:
        words = shlex.split(text)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise OptionError(
            f"{path}: key 'cross_compiler': cannot split {text!r} into a command "
            f"({str(exc).lower()})"
        ) from exc
    if not words or not words[0]:
        raise OptionError(f"{path}: key 'cross_compiler': {text!r} names no compiler program")
    if words[0] == NO_COMPILER:
        raise OptionError(
            f"{path}: key 'cross_compiler': \"{NO_COMPILER}\" takes no options, got {text!r}"
        )
    return words[0], tuple(words[1:])


def load(name_or_path: str | os.PathLike) -> TargetConfig:
    """Load a target config by shipped name (see :func:`available`) or by path.

    Raises :class:`OptionError` naming the file and key for anything invalid.
    """
    path = _resolve(name_or_path)
    data = _read_toml(path)

    _check_table(path, "", data, _TOP_KEYS, optional=_OPTIONAL_TOP)
    _check_table(path, "tuning.", data["tuning"], _TUNING_KEYS)
    _check_table(path, "runner.", data["runner"], _RUNNER_KEYS, optional=("key",))

    description = data["description"].strip()
    if not description or "\n" in description:
        raise OptionError(f"{path}: key 'description' must be one non-empty line")
    round_to = _positive(path, "round_to", data["round_to"])
    fmt = data["format"]
    if fmt not in FORMATS:
        raise OptionError(f"{path}: key 'format' must be one of {FORMATS}, got {fmt!r}")
    cross_compiler, compiler_options = _split_compiler(path, data["cross_compiler"])

    tuning = Tuning(
        trials=_positive(path, "tuning.trials", data["tuning"]["trials"]),
        trials_per_task=_positive(
            path, "tuning.trials_per_task", data["tuning"]["trials_per_task"]
        ),
    )
    if tuning.trials_per_task > tuning.trials:
        raise OptionError(
            f"{path}: key 'tuning.trials_per_task' ({tuning.trials_per_task}) exceeds "
            f"'tuning.trials' ({tuning.trials})"
        )

    runner_kind = data["runner"]["kind"]
    if runner_kind not in RUNNERS:
        raise OptionError(
            f"{path}: key 'runner.kind' must be one of {RUNNERS}, got {runner_kind!r}"
        )
    key = data["runner"].get("key")
    if runner_kind == "rpc" and not key:
        raise OptionError(f"{path}: missing key 'runner.key' (the RPC tracker key)")
    if runner_kind == "local" and key is not None:
        raise OptionError(f"{path}: key 'runner.key' is only meaningful with kind = \"rpc\"")
    runner = Runner(runner_kind, key)

    _check_target_spec(path, "target", data["target"])
    target = _resolve_auto(path, "target", data["target"])
    _check_llvm_cpu(path, "target", target)
    host = None
    if "host" in data:
        _check_target_spec(path, "host", data["host"])
        host = _resolve_auto(path, "host", data["host"])
        _check_llvm_cpu(path, "host", host)
    tgt = _build_target(path, target, host)
    _check_linkable(path, tgt, fmt, cross_compiler)

    config = TargetConfig(
        name=path.name[: -len(".toml")] if path.name.endswith(".toml") else path.name,
        description=description,
        target=_freeze(target),
        host=_freeze(host) if host is not None else None,
        cross_compiler=cross_compiler,
        compiler_options=compiler_options,
        round_to=round_to,
        tuning=tuning,
        runner=runner,
        format=fmt,
        source=path,
    )
    logger.debug("loaded target %s from %s: %s", config.name, path, tgt)
    return config
