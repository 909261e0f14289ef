"""Deployment targets: shipped TOML configs load, validate and compile untuned for every board.

Real TVM throughout. Boards and GPUs are compiled for, not run: the aarch64 ``.so`` is checked
by its ELF header and dynamic symbols, device code by the kernels in the device module. The
x86 host artifact is loaded and run on the VM.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tvm
from helpers import load, random_input, run
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm_qmfrg.passes.prune import QMFRGPrune
from tvm_qmfrg.targets import (
    Artifact,
    TargetConfig,
    ToolchainError,
    available,
    build,
    compile_module,
)
from tvm_qmfrg.targets import load as load_target
from tvm_qmfrg.targets.tune import build_candidate, export_candidate
from tvm_qmfrg.targets.tune import prepare as prepare_for_tuning

from tvm_qmfrg import OptionError
from tvm_qmfrg.onnxio import synthetic

SHIPPED = [
    "arm-cortex-a76",
    "arm-rasp4b64",
    "arm-rk3399",
    "cuda-jetson-orin-nano",
    "cuda-sm86",
    "cuda-sm90",
    "opencl-adreno",
    "opencl-mali",
    "x86-host",
]
# device module kind per shipped target (None: CPU, no device module)
DEVICE_KIND = {
    "cuda-jetson-orin-nano": "cuda",
    "cuda-sm86": "cuda",
    "cuda-sm90": "cuda",
    "opencl-adreno": "opencl",
    "opencl-mali": "opencl",
}
EM_AARCH64 = 183
ET_DYN = 3
CROSS_READELF = "aarch64-linux-gnu-readelf"


@pytest.fixture(scope="module")
def cnn_model():
    return synthetic.small_cnn(channels=(16, 32))


@pytest.fixture(scope="module")
def cnn(cnn_model):
    return load(cnn_model)


def device_modules(executable) -> list:
    """Every module imported below the VM executable's host library, depth first."""
    found, stack = [], list(executable.mod.imports)
    while stack:
        m = stack.pop()
        found.append(m)
        stack.extend(m.imports)
    return [m for m in found if m.kind not in ("llvm", "c", "static_library")]


def elf_header(path: Path) -> dict:
    raw = path.read_bytes()[:20]
    assert raw[:4] == b"\x7fELF", f"{path} is not an ELF file"
    e_type, e_machine = struct.unpack_from("<HH", raw, 16)
    return {"class": raw[4], "data": raw[5], "type": e_type, "machine": e_machine}


def defined_dynamic_symbols(path: Path) -> set[str]:
    out = subprocess.run(
        [CROSS_READELF, "--dyn-syms", "-W", str(path)], capture_output=True, text=True, check=True
    ).stdout
    names = set()
    for line in out.splitlines():
        cols = line.split()
        # Num: Value Size Type Bind Vis Ndx Name
        if len(cols) >= 8 and cols[0].endswith(":") and cols[6] != "UND":
            names.add(cols[7])
    return names


# -- configs ---------------------------------------------------------------------------------


def test_available_lists_the_shipped_targets():
    assert available() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads(name):
    config = load_target(name)
    assert isinstance(config, TargetConfig)
    assert config.name == name
    assert config.description and "\n" not in config.description
    assert config.round_to >= 1
    assert config.format in ("so", "tar")
    assert 1 <= config.tuning.trials_per_task <= config.tuning.trials
    assert config.runner.kind in ("local", "rpc")
    assert (config.runner.key is not None) == (config.runner.kind == "rpc")
    target = config.tvm_target()
    assert isinstance(target, tvm.target.Target)
    if name in DEVICE_KIND:
        assert target.host is not None, f"{name}: a GPU target needs a host"
        assert "gpu" in list(target.keys)
    hash(config)  # frozen and hashable despite the mapping fields
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.round_to = 1


def test_x86_host_detects_this_cpu():
    config = load_target("x86-host")
    target = config.tvm_target()
    assert str(target.attrs["mcpu"]) == str(tvm.target.codegen.llvm_get_system_cpu())
    assert int(target.attrs["num-cores"]) == len(os.sched_getaffinity(0))
    assert config.cross_compiler is None and config.runner.kind == "local"


def test_tags_and_hosts_of_the_boards():
    assert load_target("arm-rk3399").tvm_target().tag == "arm/rk3399"
    orin = load_target("cuda-jetson-orin-nano").tvm_target()
    assert orin.tag == "nvidia/jetson-orin-nano" and str(orin.attrs["arch"]) == "sm_87"
    assert str(orin.host.attrs["mtriple"]) == "aarch64-linux-gnu"
    assert str(orin.host.attrs["mcpu"]) == "cortex-a78ae"  # the tag says carmel (Xavier)
    for name, arch in (("cuda-sm86", "sm_86"), ("cuda-sm90", "sm_90")):
        t = load_target(name).tvm_target()
        assert str(t.attrs["arch"]) == arch and str(t.host.attrs["mtriple"]).startswith("x86_64")
    a76 = load_target("arm-cortex-a76").tvm_target()
    assert str(a76.attrs["mcpu"]) == "cortex-a76" and "+dotprod" in list(a76.attrs["mattr"])
    mali = load_target("opencl-mali").tvm_target()
    assert str(mali.attrs["device"]) == "mali" and "mali" in list(mali.keys)
    adreno = load_target("opencl-adreno").tvm_target()
    assert "adreno" in list(adreno.keys) and str(adreno.host.attrs["mtriple"]).startswith("aarch64")


def test_user_config_by_path(tmp_path):
    text = (Path(load_target("arm-rk3399").source)).read_text()
    path = tmp_path / "my-board.toml"
    path.write_text(text.replace('key = "rk3399"', 'key = "my-board"'))
    config = load_target(path)
    assert config.name == "my-board" and config.runner.key == "my-board"
    assert load_target(str(path)) == config


def test_unknown_target_name_lists_the_shipped_ones():
    with pytest.raises(OptionError, match="unknown target 'rk9999'.*arm-rk3399"):
        load_target("rk9999")
    with pytest.raises(OptionError, match="no such file"):
        load_target("/nonexistent/board.toml")


GOOD = """\
description = "test board"
round_to = 4
format = "so"
cross_compiler = "aarch64-linux-gnu-g++"

[target]
tag = "arm/rk3399"

[tuning]
trials = 100
trials_per_task = 10

[runner]
kind = "rpc"
key = "board"
"""

GPU = """\
description = "test gpu"
round_to = 8
format = "tar"
cross_compiler = "none"

[target]
kind = "cuda"
arch = "sm_86"

[tuning]
trials = 100
trials_per_task = 10

[runner]
kind = "local"
"""


def _edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


BAD = {
    "unknown-top-key": (_edit(GOOD, "round_to = 4", "round_to = 4\ncolour = 1"), "colour"),
    "unknown-tuning-key": (_edit(GOOD, "trials = 100", "trials = 100\nseed = 1"), "tuning.seed"),
    "unknown-runner-key": (_edit(GOOD, 'key = "board"', 'key = "b"\nport = 1'), "runner.port"),
    "missing-round_to": (_edit(GOOD, "round_to = 4\n", ""), "round_to"),
    "missing-tuning": (GOOD.split("[tuning]")[0] + "[runner]\nkind = 'local'\n", "tuning"),
    "missing-trials": (_edit(GOOD, "trials = 100\n", ""), "tuning.trials"),
    "round_to-string": (_edit(GOOD, "round_to = 4", 'round_to = "4"'), "round_to"),
    "round_to-bool": (_edit(GOOD, "round_to = 4", "round_to = true"), "round_to"),
    "round_to-zero": (_edit(GOOD, "round_to = 4", "round_to = 0"), "round_to"),
    "trials-negative": (_edit(GOOD, "trials = 100", "trials = -5"), "tuning.trials"),
    "per-task-over-total": (
        _edit(GOOD, "trials_per_task = 10", "trials_per_task = 1000"),
        "tuning.trials_per_task",
    ),
    "format-unknown": (_edit(GOOD, 'format = "so"', 'format = "zip"'), "format"),
    "description-two-lines": (
        _edit(GOOD, 'description = "test board"', 'description = """a\nb"""'),
        "description",
    ),
    "cross-compiler-empty": (_edit(GOOD, '"aarch64-linux-gnu-g++"', '""'), "cross_compiler"),
    "cross-compiler-unbalanced-quote": (
        _edit(GOOD, '"aarch64-linux-gnu-g++"', '"aarch64-linux-gnu-g++ \'-O2"'),
        "cross_compiler",
    ),
    "cross-compiler-none-with-options": (
        _edit(GOOD, '"aarch64-linux-gnu-g++"', '"none -O2"'),
        "cross_compiler",
    ),
    "runner-kind": (_edit(GOOD, 'kind = "rpc"', 'kind = "ssh"'), "runner.kind"),
    "rpc-without-key": (_edit(GOOD, 'key = "board"\n', ""), "runner.key"),
    "local-with-key": (_edit(GOOD, 'kind = "rpc"', 'kind = "local"'), "runner.key"),
    "unknown-tag": (_edit(GOOD, "arm/rk3399", "arm/rk9999"), "target.tag"),
    "target-without-kind": (_edit(GOOD, 'tag = "arm/rk3399"', 'mcpu = "cortex-a72"'), "target"),
    "target-unknown-option": (
        _edit(GOOD, 'tag = "arm/rk3399"', 'kind = "llvm"\nfoo = 1'),
        "target",
    ),
    "target-bad-kind": (_edit(GOOD, 'tag = "arm/rk3399"', 'kind = "llvmx"'), "target"),
    "target-bad-mcpu": (
        _edit(GOOD, 'tag = "arm/rk3399"', 'tag = "arm/rk3399"\nmcpu = "cortex-z9"'),
        "target.mcpu",
    ),
    "auto-on-wrong-key": (
        _edit(GOOD, 'tag = "arm/rk3399"', 'kind = "llvm"\nmtriple = "auto"'),
        "target.mtriple",
    ),
    "auto-on-gpu": (_edit(GPU, 'arch = "sm_86"', 'arch = "sm_86"\nmcpu = "auto"'), "target"),
    "target-not-table": (
        _edit(GOOD, '[target]\ntag = "arm/rk3399"', 'target = "arm/rk3399"'),
        "target",
    ),
    "gpu-without-host": (GPU, "host"),
    "host-not-cpu": (GPU + '\n[host]\nkind = "cuda"\n', "host.kind"),
    "host-inside-target": (
        _edit(GPU, 'arch = "sm_86"', 'arch = "sm_86"\nhost = "llvm"'),
        "target.host",
    ),
    "host-bad-mcpu": (
        GPU + '\n[host]\nkind = "llvm"\nmtriple = "aarch64-linux-gnu"\nmcpu = "znver4"\n',
        "host.mcpu",
    ),
    "so-without-cross-compiler": (
        _edit(GOOD, 'cross_compiler = "aarch64-linux-gnu-g++"', 'cross_compiler = "none"'),
        "cross_compiler",
    ),
    "not-toml": ("description = \n", ""),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_names_file_and_key(tmp_path, case):
    text, key = BAD[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text)
    with pytest.raises(OptionError) as err:
        load_target(path)
    message = str(err.value)
    assert str(path) in message
    if key:
        assert f"'{key}" in message, message


def test_good_config_text_is_good(tmp_path):
    # the BAD cases are single edits of these two, so both must load as they are
    (tmp_path / "good.toml").write_text(GOOD)
    assert load_target(tmp_path / "good.toml").tvm_target().tag == "arm/rk3399"
    (tmp_path / "gpu.toml").write_text(GPU + '\n[host]\nkind = "llvm"\n')
    assert load_target(tmp_path / "gpu.toml").tvm_target().host is not None


# -- building -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_every_target_builds_untuned(cnn, tmp_path, name, caplog):
    with caplog.at_level(logging.WARNING, logger="tvm_qmfrg"):
        artifact = build(cnn, name, work_dir=tmp_path, model="small_cnn")
    assert isinstance(artifact, Artifact)
    config = load_target(name)
    assert artifact.target == name and artifact.format == config.format and not artifact.tuned
    assert artifact.path == tmp_path / f"{name}.{config.format}"
    assert artifact.path.stat().st_size > 0
    # no leftovers: the artifact and its input signature
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        artifact.path.name,
        artifact.path.name + ".json",
    ]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "untuned" in warnings[0].getMessage()
    assert "small_cnn" in warnings[0].getMessage() and name in warnings[0].getMessage()

    devices = device_modules(artifact.executable)
    expected = DEVICE_KIND.get(name)
    assert [m.kind for m in devices] == ([expected] if expected else [])
    if config.format == "tar":
        with tarfile.open(artifact.path) as tar:
            assert any(n.endswith(".o") for n in tar.getnames())
    else:
        header = elf_header(artifact.path)
        assert header["type"] == ET_DYN and header["class"] == 2  # 64-bit shared object
        code = config.tvm_target()
        code = code.host if code.host is not None else code
        triple = str(code.attrs.get("mtriple", "") or tvm.target.codegen.llvm_get_system_triple())
        assert (header["machine"] == EM_AARCH64) == triple.startswith("aarch64")


def test_rk3399_pruned_cross_compiled_so(cnn, tmp_path):
    config = load_target("arm-rk3399")
    assert config.round_to == 4
    prune = QMFRGPrune(flops_reduction=0.5, round_to=config.round_to, model="small_cnn")
    pruned = prune(cnn)
    assert prune.plan.groups and all(g.kept_channels % 4 == 0 for g in prune.plan.groups)
    assert abs(prune.plan.flops_reduction - 0.5) <= 0.05

    artifact = build(pruned, config, output=tmp_path / "deploy" / "cnn.so")
    assert artifact.path == tmp_path / "deploy" / "cnn.so" and artifact.format == "so"
    header = elf_header(artifact.path)
    assert header["machine"] == EM_AARCH64
    assert header["type"] == ET_DYN and header["class"] == 2 and header["data"] == 1

    symbols = defined_dynamic_symbols(artifact.path)
    # the serialized VM executable + import tree, and one packed entry per kernel
    assert "__tvm_ffi__library_bin" in symbols
    kernels = {s for s in symbols if s.startswith("__tvm_ffi_") and s != "__tvm_ffi__library_bin"}
    assert any("conv2d" in s for s in kernels), sorted(symbols)


def test_tuning_candidates_for_a_board_are_cross_linked_here(cnn):
    # what MetaSchedule's builder does with each candidate of an arm-rk3399 tuning run: the
    # board gets a ready AArch64 .so, not a .tar it would have to link with its own compiler
    config = load_target("arm-rk3399")
    target = config.tvm_target()
    (task, *_) = ms.relax_integration.extract_tasks(prepare_for_tuning(cnn, target), target)
    built = build_candidate(task.dispatched[0], target)
    path = Path(export_candidate(built, config.cross_compiler))
    assert path.suffix == ".so"
    header = elf_header(path)
    assert header["machine"] == EM_AARCH64 and header["type"] == ET_DYN
    assert any(s.startswith("__tvm_ffi_") for s in defined_dynamic_symbols(path))


def test_jetson_device_module_holds_cuda_kernels(cnn, tmp_path):
    config = load_target("cuda-jetson-orin-nano")
    artifact = build(cnn, config, work_dir=tmp_path)
    (cuda,) = device_modules(artifact.executable)
    assert cuda.kind == "cuda"
    source = cuda.inspect_source("cuda")
    kernels = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)', source)
    assert any("conv2d" in k for k in kernels), kernels[:5]
    assert elf_header(artifact.path)["machine"] == EM_AARCH64

    # the kernels are valid CUDA for the Orin's sm_87 (the artifact carries source; the board
    # compiles it at load time, so check it compiles here)
    nvcc = shutil.which("nvcc")
    assert nvcc, "nvcc is needed to check the CUDA kernels (it is on PATH on this machine kind)"
    cu = tmp_path / "kernels.cu"
    cu.write_text(source)
    arch = str(config.tvm_target().attrs["arch"])
    subprocess.run(
        [nvcc, "-cubin", f"-arch={arch}", "-o", str(tmp_path / "kernels.cubin"), str(cu)],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "kernels.cubin").read_bytes()[:4] == b"\x7fELF"


def test_adreno_yields_opencl_kernels(cnn):
    executable = compile_module(cnn, "opencl-adreno")
    (opencl,) = device_modules(executable)
    assert opencl.kind == "opencl"
    source = opencl.inspect_source("cl")
    assert source.count("__kernel void") >= 3
    assert re.search(r"__kernel void \w*conv2d\w*", source)


def test_x86_host_artifact_runs_and_matches_plain_llvm(cnn_model, cnn, tmp_path):
    artifact = build(cnn, "x86-host", work_dir=tmp_path)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact.path)), tvm.cpu())
    x = random_input(cnn_model, seed=1)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, run(cnn, x), rtol=1e-5, atol=1e-5)


def test_missing_cross_compiler_names_the_debian_packages(cnn, tmp_path):
    config = dataclasses.replace(load_target("arm-rk3399"), cross_compiler="riscv64-linux-gnu-g++")
    with pytest.raises(ToolchainError, match="apt-get install -y gcc-riscv64-linux-gnu g"):
        build(cnn, config, work_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_output_suffix_must_match_format(cnn, tmp_path):
    with pytest.raises(OptionError, match=r"opencl-adreno: output .*\.so must end in \.tar"):
        build(cnn, "opencl-adreno", output=tmp_path / "model.so")


X86_WITH_OPTIONS = """\
description = "this machine, linked with options"
round_to = 8
format = "so"
cross_compiler = "env LC_ALL=C g++ -O2 '-Wl,-soname,libqmfrg-options.so'"

[target]
kind = "llvm"

[tuning]
trials = 10
trials_per_task = 10

[runner]
kind = "local"
"""


def test_cross_compiler_options_are_split_and_reach_the_linker(cnn_model, cnn, tmp_path):
    # a launcher (env) with its own arguments, the compiler, a flag, a quoted linker option:
    # split like a shell, run in that order before the link arguments
    path = tmp_path / "x86-options.toml"
    path.write_text(X86_WITH_OPTIONS)
    config = load_target(path)
    assert config.cross_compiler == "env"
    assert config.compiler_options == ("LC_ALL=C", "g++", "-O2", "-Wl,-soname,libqmfrg-options.so")
    artifact = build(cnn, config, output=tmp_path / "cnn.so")
    assert b"libqmfrg-options.so" in artifact.path.read_bytes()  # the SONAME the option set
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact.path)), tvm.cpu())
    x = random_input(cnn_model, seed=4)
    np.testing.assert_allclose(
        vm["main"](tvm.runtime.tensor(x)).numpy(), run(cnn, x), rtol=1e-5, atol=1e-5
    )


def test_build_writes_the_input_signature_next_to_the_artifact(cnn, tmp_path):
    import hashlib
    import json

    from tvm_qmfrg.targets import export
    from tvm_qmfrg.targets.artifact import read_signature

    artifact = build(cnn, "opencl-adreno", output=tmp_path / "cnn.tar")
    sidecar = tmp_path / "cnn.tar.json"
    data = json.loads(sidecar.read_text())
    assert data["artifact"] == "cnn.tar"
    assert data["sha256"] == hashlib.sha256(artifact.path.read_bytes()).hexdigest()
    (param,) = cnn["main"].params
    expected = [{"name": "input", "shape": [1, 3, 8, 8], "dtype": "float32"}]
    assert [int(d) for d in param.ty.shape.values] == expected[0]["shape"]
    assert data["inputs"] == read_signature(artifact.path) == expected
    # a symbolic dimension is written by name
    model = synthetic.mlp(sizes=(16, 8))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    dynamic = build(load(model), "opencl-adreno", output=tmp_path / "dyn.tar")
    assert read_signature(dynamic.path)[0]["shape"] == ["batch", 16]
    # exported without a signature: the one of the earlier build is removed, not left stale
    export(artifact.executable, "opencl-adreno", artifact.path)
    assert not sidecar.exists()


def test_rebuild_replaces_the_artifact(cnn, tmp_path):
    out = tmp_path / "m.tar"
    out.write_bytes(b"stale")
    artifact = build(cnn, "opencl-adreno", output=out)
    assert tarfile.is_tarfile(artifact.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tar", "m.tar.json"]
