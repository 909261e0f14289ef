"""Artifacts on disk: linking a shared library with a config's compiler, and the input
signature written next to an artifact (``<artifact>.json``: input names, shapes, dtypes and
the artifact's sha256), which ``bench`` reads so that it needs no ``--input-shape``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tvm_qmfrg.errors import ModelError

from .translate import reason


def debian_packages(compiler: str) -> str:
    base = os.path.basename(compiler)
    for tool in ("g++", "gcc"):
        if base.endswith("-" + tool):
            triple = base[: -len(tool) - 1]
            return f"gcc-{triple} g++-{triple}"
    if base in ("g++", "c++", "gcc", "cc"):
        return "g++"
    return ""


def link_shared(command: Sequence[str], output: str, objects, options=None) -> None:
    """Link ``objects`` into the shared library ``output`` with the compiler ``command``.

    Runs ``command... -shared -fPIC -o output [options] objects``: the config's words come
    first, in order, so a launcher works as well as flags do (``g++ -O2``, ``ccache g++``,
    ``zig c++ -target aarch64-linux-gnu``). TVM's own ``cc.cross_compiler("g++ -O2")`` would
    run a program named ``g++ -O2``, and its ``options`` go after ``-o``, which breaks
    launchers. Raises ``RuntimeError`` with the compiler's output when it fails.
    """
    cmd = [*command, "-shared", "-fPIC", "-o", output, *(options or [])]
    cmd += [objects] if isinstance(objects, str) else list(objects)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        out = proc.stdout.decode("utf-8", errors="replace").strip()
        raise RuntimeError(f"linking failed: {' '.join(cmd)}: {out}")
    if not os.path.isfile(output):
        raise RuntimeError(f"{' '.join(cmd)} exited 0 but wrote no {os.path.basename(output)}")


def cross_fcompile(compiler: str, options: Sequence[str] = ()):
    """An ``export_library`` fcompile linking with ``compiler`` and ``options`` (see
    :func:`link_shared`); a fresh one per export (TVM's wrapper appends to its option list)."""
    from tvm.support import cc

    return cc.cross_compiler(functools.partial(link_shared, (compiler, *options)))


def signature_path(artifact: str | os.PathLike) -> Path:
    """Where the input signature of ``artifact`` lives: ``<artifact>.json``."""
    artifact = Path(artifact)
    return artifact.with_name(artifact.name + ".json")


def input_signature(mod) -> list[dict] | None:
    """``main``'s parameters as ``[{"name", "shape", "dtype"}]`` (None if not all tensors).

    A symbolic dimension is written as its name (a string).
    """
    import tvm
    from tvm import relax

    if "main" not in {gv.name_hint for gv in mod.get_global_vars()}:
        return None
    inputs = []
    for param in mod["main"].params:
        ty = param.ty
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            return None
        shape = getattr(ty.shape, "values", None)
        if shape is None:
            return None
        dims = [int(d) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in shape]
        inputs.append({"name": str(param.name), "shape": dims, "dtype": str(ty.dtype)})
    return inputs


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_signature(artifact: str | os.PathLike) -> list[dict]:
    """The input signature written next to ``artifact`` by :func:`export`.

    Raises :class:`ModelError` naming the file when the artifact or its signature is missing,
    unreadable, or was written for another build of the artifact (its sha256 differs).
    """
    artifact = Path(artifact)
    path = signature_path(artifact)
    if not artifact.is_file():
        raise ModelError(f"artifact {artifact}: no such file")
    if not path.is_file():
        raise ModelError(
            f"artifact {artifact}: no input signature {path.name} next to it (tvm-qmfrg "
            "compile writes one); give the input shapes with --input-shape NAME=D1,D2,..."
        )
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        inputs = data["inputs"]
        sha = data["sha256"]
        if not isinstance(inputs, list) or not all(
            isinstance(i["name"], str)
            and isinstance(i["dtype"], str)
            and isinstance(i["shape"], list)
            and all(isinstance(d, (int, str)) for d in i["shape"])
            for i in inputs
        ):
            raise ValueError("inputs must be [{name, shape, dtype}]")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"input signature {path}: unreadable ({reason(exc)})") from exc
    if sha != sha256_file(artifact):
        raise ModelError(
            f"input signature {path}: written for another build of {artifact.name} (sha256 "
            "differs); rebuild it, or give the input shapes with --input-shape"
        )
    return inputs
