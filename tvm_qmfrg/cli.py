"""The ``tvm-qmfrg`` command line. The only module that prints.

Each command parses its arguments, calls the library (the passes, the targets, the apps)
and prints the result. A command imports what it runs inside its own function, so that
``--help``, a bad flag or an unreadable file is answered without loading TVM.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import OptionError, QMFRGError

log = logging.getLogger("tvm_qmfrg")


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="spectral report of every conv/dense operator of an ONNX model",
        description="Per operator: effective and stable rank of its normalized spectrum, its "
        "nearest other operator by Fubini-Study and Wasserstein-2 distance, and how many of "
        "its output-channel pairs lie within EPSILON radians.",
    )
    p.add_argument("model", nargs="?", help="ONNX file (default: the shipped digits ResNet)")
    p.add_argument(
        "--epsilon",
        type=float,
        default=0.05,
        help="radius in radians for close channel pairs (default 0.05)",
    )
    _add_input_shape(p)
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    p.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze_operators
    from .onnxio.reader import default_model_path, linear_operators, load_onnx, model_name
    from .report import analysis_table, write_json

    path = args.model or default_model_path()
    if not 0 <= args.epsilon <= math.pi / 2:
        raise OptionError(f"--epsilon {args.epsilon} is outside [0, pi/2]")
    model = load_onnx(path)
    name = model_name(model, fallback=path)
    ops = linear_operators(model, name=path)
    if not ops:
        raise OptionError(f"{path}: no Conv/Gemm/MatMul operator with a constant weight")
    analysis = analyze_operators(ops, model=path, epsilon=args.epsilon)
    print(f"{path} ({name}): {len(ops)} linear operators")
    print(analysis_table(analysis))
    shapes = {k: list(v) for k, v in (_parse_shape(s) for s in args.input_shape)}
    coverage = _coverage(model, shapes, path)
    report = analysis.to_dict()
    report["pruning"] = coverage
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def _coverage(model, shapes: dict, path: str) -> dict:
    """Print and return what the pruning pass could touch: prunable FLOPs, frozen groups."""
    from .passes.onnx_io import import_model
    from .passes.prune import prune_module

    print("\npruning coverage (channel analysis of the model imported into TVM):")
    try:
        imported = import_model(model, shapes, name=path)
        plan, _ = prune_module(imported.mod, sparsity=0.0, model=path)
    except QMFRGError as exc:
        print(f"  not available: {exc}")
        return {"error": str(exc)}
    print(
        f"  {plan.coverage:.1%} of conv/matmul FLOPs are in ops of the {len(plan.groups)} "
        f"prunable groups; {len(plan.frozen)} groups frozen"
    )
    reasons: dict[str, int] = {}
    for f in plan.frozen:
        key = f.reason.split(": ", 1)[-1]
        reasons[key] = reasons.get(key, 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"  frozen ({n}): {reason}")
    return {
        "coverage": plan.coverage,
        "prunable_groups": len(plan.groups),
        "frozen": [
            {"name": f.name, "channels": f.channels, "reason": f.reason} for f in plan.frozen
        ],
    }


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="remove redundant channels, neurons and heads (shapes really shrink)",
        description="Prune an ONNX model with the QMFRGPrune Relax pass and report channels, "
        "FLOPs and parameters before and after. Give exactly one of --flops-reduction, "
        "--sparsity or --epsilon.",
    )
    p.add_argument("model", help="ONNX file")
    add_prune_options(p, required=True)
    add_data_options(p)
    p.add_argument(
        "--substitute",
        metavar="KINDS",
        default="",
        help="after pruning, substitute operators: lowrank,dedup (or one of them)",
    )
    p.add_argument(
        "--sub-epsilon",
        type=float,
        default=0.05,
        metavar="RAD",
        help="FS angle certified by a substitution (default 0.05)",
    )
    _add_input_shape(p)
    p.add_argument("--plan", metavar="OUT.json", help="write the pruning plan as JSON")
    p.add_argument("--report", metavar="OUT.json", help="write the substitution report as JSON")
    p.add_argument(
        "--output",
        "-o",
        metavar="OUT.onnx",
        help="write the pruned model as ONNX: your graph with the pruned weights, shapes and "
        "groups patched in, checked in onnxruntime against TVM before it is written",
    )
    p.set_defaults(func=_cmd_prune)


def add_prune_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    """The pruning options (:class:`~tvm_qmfrg.options.PruneOptions`) of ``prune`` and
    ``compile``; choices come from the criteria and allocation registries."""
    from .criteria import CRITERIA
    from .options import ALLOCATIONS

    target = p.add_mutually_exclusive_group(required=required)
    target.add_argument(
        "--flops-reduction",
        type=float,
        metavar="F",
        help="fraction of conv/matmul FLOPs to remove, allocated across layers",
    )
    target.add_argument(
        "--sparsity",
        type=float,
        metavar="S",
        help="fraction of channels to remove in every prunable group",
    )
    target.add_argument(
        "--epsilon",
        type=float,
        metavar="RAD",
        help="lossless mode: merge only channels within RAD radians (exact merges)",
    )
    p.add_argument(
        "--criterion",
        default="qmfrg",
        help=f"channel criterion: {', '.join(CRITERIA)} (default qmfrg)",
    )
    p.add_argument(
        "--round-to",
        type=int,
        default=None,
        metavar="N",
        help="round kept channel counts up to a multiple of N (default 1; compile: the target's)",
    )
    p.add_argument("--min-channels", type=int, default=1, metavar="N")
    p.add_argument(
        "--allocation",
        choices=list(ALLOCATIONS),
        default="auto",
        help="FLOPs budget across layers: the same fraction of every group (uniform), one "
        "ranking of the criterion's normalized costs (global), or by each group's measured "
        "effect on the output (sensitivity, needs --calibration); default auto: sensitivity "
        "with --calibration, else uniform",
    )
    p.add_argument(
        "--protect",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave groups whose producer name matches GLOB intact (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random criterion")


def prune_options(args: argparse.Namespace, round_to: int = 1):
    """The :class:`~tvm_qmfrg.options.PruneOptions` of parsed ``prune``/``compile`` args."""
    from .options import PruneOptions

    return PruneOptions(
        criterion=args.criterion,
        sparsity=args.sparsity,
        flops_reduction=args.flops_reduction,
        epsilon=args.epsilon,
        min_channels=args.min_channels,
        round_to=args.round_to if args.round_to is not None else round_to,
        allocation=args.allocation,
        protect=tuple(args.protect),
        seed=args.seed,
    )


def add_data_options(p: argparse.ArgumentParser) -> None:
    """``--calibration``, ``--preprocess`` and ``--validate`` of ``prune`` and ``compile``
    (formats: :mod:`tvm_qmfrg.calibration_data`)."""
    p.add_argument(
        "--calibration",
        metavar="PATH",
        help="calibration samples: a .npy (one-input model), a .npz (one array per input "
        "name) or a folder of images (needs --preprocess); the leading axis counts the "
        "samples. The pruned layers' consumers are refit on them (a few hundred suffice)",
    )
    p.add_argument(
        "--preprocess",
        metavar="SPEC",
        help="how images of a folder become inputs, e.g. size=224,mean=127.5,std=127.5,"
        "layout=NCHW,channels=RGB (keys: size=N|HxW, resize=stretch|shorter, "
        "channels=RGB|BGR|GRAY, scale=F, mean=M|M1/M2/M3, std=S|S1/S2/S3, layout=NCHW|NHWC)",
    )
    p.add_argument(
        "--validate",
        metavar="PATH",
        help="held-out samples (same formats as --calibration): print how closely the "
        "pruned model follows the dense one on them (top-1 agreement for a classifier, "
        "else mean cosine of the first output), in onnxruntime, before anything is written",
    )


def _check_data_flags(args: argparse.Namespace) -> None:
    """What the data flags need of each other, before any file is read."""
    if args.preprocess is None:
        return
    from .calibration_data import parse_preprocess

    parse_preprocess(args.preprocess)
    given = [
        (flag, path)
        for flag, path in (("--calibration", args.calibration), ("--validate", args.validate))
        if path
    ]
    if not any(os.path.isdir(path) for _, path in given):
        named = " or ".join(f"{flag} {path}" for flag, path in given)
        raise OptionError(
            "--preprocess is for a folder of images, and "
            + (f"{named} is not a folder" if named else "no --calibration or --validate is given")
        )


def _load_data(args: argparse.Namespace, model, shapes: dict, dim_sizes: dict | None = None):
    """The ``--calibration`` and ``--validate`` samples (or ``None``), read and checked
    against ``model``'s inputs at the static shapes the import will give them."""
    import onnx

    from .calibration_data import load_samples, parse_preprocess, sample_count
    from .onnxio.prepare import graph_inputs, static_input_shapes

    if not (args.calibration or args.validate):
        return None, None
    static, _ = static_input_shapes(model, shapes, args.model, dim_sizes)
    types = {
        i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type or 1)
        for i in graph_inputs(model)
    }
    inputs = {k: (v, types[k]) for k, v in static.items()}
    pre = parse_preprocess(args.preprocess) if args.preprocess else None
    loaded = []
    for flag, path, what in (
        ("--calibration", args.calibration, "calibration"),
        ("--validate", args.validate, "validation"),
    ):
        if not path:
            loaded.append(None)
            continue
        samples = load_samples(path, inputs, pre if os.path.isdir(path) else None, flag=flag)
        print(f"loaded {sample_count(samples)} {what} samples from {path}", flush=True)
        loaded.append(samples)
    return loaded[0], loaded[1]


def _calibration_args(calibration, imported) -> dict:
    """``prune_module``'s data keywords: the samples and the prepared ONNX they feed."""
    if calibration is None:
        return {}
    return {"calibration": calibration, "onnx_model": imported.prepared.model}


def _print_validation(args: argparse.Namespace, imported, pruned_onnx, samples) -> None:
    """Print how the pruned ONNX follows the dense (prepared) one on the --validate data."""
    from .calibration_data import sample_count
    from .onnxio.validate import describe, fidelity

    print("validating the pruned model against the dense one in onnxruntime ...", flush=True)
    batch = int(next(iter(imported.input_shapes.values()))[0])
    results = fidelity(imported.prepared.model, pruned_onnx, samples, batch=batch, name=args.model)
    same = bool(args.calibration) and _same_path(args.calibration, args.validate)
    seen = "the calibration data, seen by the pass" if same else "not seen by the pass"
    print(f"validation ({sample_count(samples)} samples, {seen}): {describe(results)}")


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _add_input_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D1,D2,...",
        help="static size of a model input (repeatable); a symbolic leading (batch) dim "
        "defaults to 1, other symbolic dims must be given",
    )


def _cmd_prune(args: argparse.Namespace) -> int:
    from .onnxio.reader import load_onnx
    from .passes.onnx_export import export_onnx
    from .passes.onnx_io import export_model, import_model
    from .passes.prune import prune_module
    from .passes.substitute import SpectralSubstitution
    from .passes.substitute import check_options as check_substitution
    from .report import check_writable, write_atomic, write_json

    options = prune_options(args)
    kinds = tuple(k for k in args.substitute.split(",") if k)
    if kinds:
        check_substitution(args.sub_epsilon, kinds, 0.1, 1e-6)
    shapes = {k: list(v) for k, v in (_parse_shape(s) for s in args.input_shape)}
    for flag, path in (("-o", args.output), ("--plan", args.plan), ("--report", args.report)):
        if path:
            check_writable(path, flag)
    _check_data_flags(args)
    model = load_onnx(args.model)
    calibration, validation = _load_data(args, model, shapes)
    print(f"importing {args.model} into Relax ...", flush=True)
    imported = import_model(model, shapes, name=args.model)
    print("analyzing channel groups and choosing channels ...", flush=True)
    plan, pruned = prune_module(
        imported.mod, options, model=args.model, **_calibration_args(calibration, imported)
    )
    print(plan.table())
    if kinds:
        substitute = SpectralSubstitution(args.sub_epsilon, kinds)
        print("substituting operators ...", flush=True)
        pruned = substitute(pruned)
        print(substitute.report.table())
    onnx_model = None
    if args.output or validation is not None:
        why = "" if args.output else " for validation"
        print(f"writing back to ONNX{why}, checking it in onnxruntime against TVM ...", flush=True)
        if kinds:  # substitution changes the graph's structure: emit it from Relax
            outputs = [o.name for o in model.graph.output]
            onnx_model = export_onnx(pruned, model_name=imported.name, output_names=outputs)
        else:
            onnx_model = export_model(imported, pruned)
    if validation is not None:
        _print_validation(args, imported, onnx_model, validation)
    if args.plan:
        plan.save(args.plan)
        print(f"wrote plan {args.plan}")
    if kinds and args.report:
        write_json(args.report, substitute.report.to_dict())
        print(f"wrote substitution report {args.report}")
    if args.output:
        write_atomic(args.output, onnx_model.SerializeToString())
        print(f"wrote pruned model {args.output}")
    return 0


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="closest operators of two models on one hypersphere, with the direct check",
        description="List the closest cross-model operator pairs by Fubini-Study distance "
        "(with Wasserstein-2), and whether each survives the direct check in the network's "
        "own basis: equal spectra are necessary for equivalence, not sufficient.",
    )
    p.add_argument("model_a")
    p.add_argument("model_b")
    p.add_argument("--top", type=int, default=10, help="how many pairs (default 10)")
    p.add_argument(
        "--delta",
        type=float,
        default=1e-3,
        help="relative residual the direct check tolerates (default 1e-3)",
    )
    p.add_argument("--json", metavar="OUT", help="also write the pairs as JSON")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_operators, pairs_json, pairs_table
    from .onnxio.reader import linear_operators, load_onnx
    from .report import write_json

    if args.top < 1 or not 0 <= args.delta < 1:
        raise OptionError(f"--top {args.top} must be >= 1 and --delta {args.delta} in [0, 1)")
    ops = []
    for path in (args.model_a, args.model_b):
        found = linear_operators(load_onnx(path), name=path)
        if not found:
            raise OptionError(f"{path}: no Conv/Gemm/MatMul operator with a constant weight")
        ops.append(found)
    pairs = compare_operators(ops[0], ops[1], top=args.top, delta=args.delta)
    print(pairs_table(pairs))
    if args.json:
        write_json(args.json, pairs_json(pairs))
        print(f"wrote {args.json}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from .criteria import ABLATIONS

    p = sub.add_parser(
        "eval",
        help="accuracy / fidelity vs FLOPs of the pruning criteria on real trained models",
        description="Prune the shipped digits ResNet and all-MiniLM-L6-v2 at each FLOPs "
        "reduction with each criterion and measure what is kept: digits test / augmented-test "
        "accuracy, MiniLM embedding fidelity (mean cosine, NN agreement@1), FLOPs, parameters "
        "and untuned TVM batch-1 latency. Criteria ending in +cal are refit on calibration "
        "data. Writes results.json, report.md and PNG figures.",
    )
    p.add_argument(
        "--reductions",
        default="0.2,0.3,0.4,0.5,0.6,0.7",
        help="comma-separated FLOPs reductions (default 0.2,...,0.7)",
    )
    p.add_argument(
        "--criteria",
        default="qmfrg,qmfrg+cal,spectral,magnitude,random,fpgm",
        help="comma-separated criteria; NAME+cal uses calibration data",
    )
    p.add_argument(
        "--ablations",
        default=",".join(ABLATIONS),
        help="parts of calibrated pruning to switch off one at a time (qmfrg+cal-X rows): "
        f"{', '.join(ABLATIONS)} (default all; '' none)",
    )
    p.add_argument(
        "--ablation-reductions",
        default="0.3",
        help="FLOPs reductions of the ablation rows (default 0.3)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds of the random criterion")
    p.add_argument(
        "--models",
        default="digits,minilm",
        help="comma-separated: digits, minilm (default both)",
    )
    p.add_argument(
        "--allocations",
        default="auto",
        help="digits: FLOPs allocation(s); several = chosen per cell on the validation split "
        "(default auto: uniform data-free, sensitivity calibrated)",
    )
    p.add_argument(
        "--ffn-sparsity",
        default="0.5",
        help="comma-separated MiniLM FFN-neuron sparsities, heads kept (default 0.5; '' none)",
    )
    p.add_argument(
        "--out",
        default="eval-report",
        metavar="DIR",
        help="folder for results.json, report.md and figures (default eval-report)",
    )
    p.set_defaults(func=_cmd_eval)


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",") if r]
    except ValueError as exc:
        raise OptionError(f"{flag}: {exc}") from exc


def _cmd_eval(args: argparse.Namespace) -> int:
    from .apps.eval_report import write_eval_report
    from .apps.evaluation import evaluate_digits
    from .apps.evaluation import summary_table as digits_table
    from .apps.fidelity import evaluate_minilm
    from .apps.fidelity import summary_table as minilm_table
    from .criteria import variant as criteria_variant
    from .onnxio.reader import default_model_path

    reductions = _floats(args.reductions, "--reductions")
    ffn = _floats(args.ffn_sparsity, "--ffn-sparsity")
    criteria = [c for c in args.criteria.split(",") if c]
    ablated = [f"qmfrg+cal-{a}" for a in args.ablations.split(",") if a]
    for c in criteria + ablated:
        criteria_variant(c)
    ablation_at = _floats(args.ablation_reductions, "--ablation-reductions")
    if args.seeds < 1:
        raise OptionError(f"--seeds {args.seeds} must be >= 1")
    allocations = [a for a in args.allocations.split(",") if a]
    if not allocations or set(allocations) - {"auto", "uniform", "global"}:
        raise OptionError(f"--allocations {args.allocations}: choose from auto, uniform, global")
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - {"digits", "minilm"}
    if unknown or not models:
        raise OptionError(f"--models {args.models}: choose from digits, minilm")
    show = lambda line: print(line, flush=True)  # noqa: E731
    digits = minilm = []
    if "digits" in models:
        digits = evaluate_digits(
            default_model_path(),
            reductions,
            criteria,
            seeds=args.seeds,
            allocations=allocations,
            ablations=ablated,
            ablation_reductions=ablation_at,
            progress=show,
        )
        print(digits_table(digits))
    if "minilm" in models:
        minilm = evaluate_minilm(
            reductions,
            criteria,
            ffn_sparsities=ffn,
            seeds=args.seeds,
            ablations=ablated,
            ablation_reductions=ablation_at,
            progress=show,
        )
        print(minilm_table(minilm))
    command = (
        f"tvm-qmfrg eval --reductions {args.reductions} --criteria {args.criteria} "
        f"--seeds {args.seeds} --models {args.models} --allocations {args.allocations} "
        f"--ffn-sparsity '{args.ffn_sparsity}' --ablations '{args.ablations}' "
        f"--ablation-reductions {args.ablation_reductions}"
    )
    written = write_eval_report(args.out, command, digits, minilm, default_model_path())
    print("wrote " + ", ".join(written))
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job on the shipped model: analyze, prune, build, measure",
        description="Analyze the shipped digits ResNet, prune it with qmfrg (calibrated on "
        "training images, the main line, and data-free) and with the magnitude baseline, "
        "build each for this host with TVM, and print accuracy and latency before and after. "
        "Writes a report folder.",
    )
    p.add_argument(
        "--flops-reduction",
        type=float,
        default=0.3,
        metavar="F",
        help="fraction of conv/matmul FLOPs to remove (default 0.3)",
    )
    p.add_argument("--out", default="demo-report", metavar="DIR", help="(default demo-report)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import os

    from .apps.demo import demo_table, run_demo
    from .selection import check_options

    check_options(None, args.flops_reduction, None, 1, 1)
    rows = run_demo(args.out, args.flops_reduction, progress=lambda s: print(s, flush=True))
    print(demo_table(rows))
    print(f"report: {os.path.join(args.out, 'report.md')}")
    return 0


def _add_compile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compile",
        help="import, prune for a deployment target, optionally tune, and export a library",
        description="Import an ONNX model, prune it with the target's channel multiple "
        "(round_to), tune it with MetaSchedule when --trials > 0 (JSON database in --work-dir, "
        "reused by later runs), then compile and export the library for the target.",
    )
    p.add_argument("model", help="ONNX file")
    p.add_argument("--target", required=True, help="shipped target name or a .toml path")
    add_prune_options(p, required=False)
    add_data_options(p)
    p.add_argument(
        "--trials", type=int, default=0, help="MetaSchedule trials in all (default 0: untuned)"
    )
    p.add_argument("--trials-per-task", type=int, metavar="N", help="default: the target's")
    p.add_argument("--work-dir", metavar="DIR", help="tuning database and logs (default tune/)")
    p.add_argument("--tracker", metavar="HOST:PORT", help="RPC tracker for targets on boards")
    p.add_argument(
        "--bind",
        action="append",
        default=[],
        metavar="DIM=SIZE",
        help="size of a symbolic input dimension when tuning (repeatable; default 1 each: "
        "tuning needs static shapes, and the tuned library takes them)",
    )
    _add_input_shape(p)
    p.add_argument("--output", "-o", metavar="OUT", help="library to write (.so or .tar)")
    p.set_defaults(func=_cmd_compile)


class _ProgressBar:
    """One line per tuning task on stderr, redrawn in place on a terminal."""

    def __init__(self, stream=sys.stderr, width: int = 24):
        self.stream = stream
        self.width = width
        self.task = None
        self.tty = stream.isatty()

    def __call__(self, p) -> None:
        if self.task is not None and p.task != self.task and self.tty:
            self.stream.write("\n")
        self.task = p.task
        filled = min(self.width, self.width * p.trials // max(1, p.budget))
        best = f"{p.best_ms:.4f} ms" if p.best_ms is not None else "-"
        line = (
            f"task {p.task}/{p.tasks} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"{p.trials}/{p.budget} trials, best {best}  {p.name}"
        )
        cols = shutil.get_terminal_size((120, 20)).columns
        self.stream.write(("\r" + line[: cols - 1]) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.task is not None and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _cmd_compile(args: argparse.Namespace) -> int:
    from .onnxio.reader import load_onnx
    from .passes.onnx_io import export_model, import_model
    from .passes.prune import prune_module
    from .report import check_writable
    from .targets import build
    from .targets import load as load_target

    logging.getLogger("tvm_qmfrg").setLevel(logging.INFO)
    logging.getLogger("tvm_qmfrg.targets.tune").setLevel(logging.WARNING)  # the bar shows it
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    config = load_target(args.target)
    if args.trials < 0:
        raise OptionError(f"--trials {args.trials} must be >= 0")
    bindings = dict(_parse_binding(b) for b in args.bind)
    if bindings and args.trials == 0:
        raise OptionError("--bind sizes dimensions for tuning: it needs --trials > 0")
    if args.tracker and config.runner.kind != "rpc":
        raise OptionError(f"--tracker: target {config.name} measures locally (runner 'local')")
    shapes = {k: list(v) for k, v in (_parse_shape(s) for s in args.input_shape)}
    if args.output:
        check_writable(args.output, "-o")
    if args.work_dir:
        _check_work_dir(args.work_dir)
    pruning = any(x is not None for x in (args.flops_reduction, args.sparsity, args.epsilon))
    for flag, value in (("--calibration", args.calibration), ("--validate", args.validate)):
        if value and not pruning:
            raise OptionError(
                f"{flag} is for pruning: give --flops-reduction, --sparsity or --epsilon"
            )
    _check_data_flags(args)
    model = load_onnx(args.model)
    calibration, validation = _load_data(args, model, shapes, bindings)
    print(f"importing {args.model} into Relax ...", flush=True)
    imported = import_model(model, shapes, name=args.model, dim_sizes=bindings)
    mod = imported.mod
    if pruning:
        options = prune_options(args, round_to=config.round_to)
        print(f"pruning for {config.name} (channels rounded to {options.round_to}) ...", flush=True)
        plan, mod = prune_module(
            mod, options, model=args.model, **_calibration_args(calibration, imported)
        )
        print(plan.table())
        if validation is not None:
            print("exporting the pruned model to ONNX for validation ...", flush=True)
            _print_validation(args, imported, export_model(imported, mod), validation)
    work_dir = args.work_dir or ("tune" if args.trials > 0 else None)
    extra = {}
    if args.trials > 0:
        print(f"tuning {args.trials} trials, database in {work_dir} ...", flush=True)
        extra["progress"] = bar = _ProgressBar()
    try:
        artifact = build(
            mod,
            config,
            work_dir=work_dir,
            output=args.output,
            model=args.model,
            trials=args.trials,
            trials_per_task=args.trials_per_task,
            tracker=args.tracker,
            **extra,
        )
    finally:
        if args.trials > 0:
            bar.close()
    state = "tuned" if artifact.tuned else "untuned"
    print(f"wrote {artifact.path} ({config.name}, {artifact.format}, {state})")
    return 0


def _check_work_dir(path: str) -> None:
    """``--work-dir`` must be (or become) a writable directory; checked before any work."""
    from .report import check_writable

    if os.path.exists(path) and not os.path.isdir(path):
        raise OptionError(f"--work-dir {path}: is a file, not a directory")
    check_writable(os.path.join(path, "database_workload.json"), "--work-dir")


def _parse_binding(text: str) -> tuple[str, int]:
    name, sep, size = text.partition("=")
    if not sep or not name or not size.strip().isdigit() or int(size) < 1:
        raise OptionError(f"--bind '{text}' must be DIM=SIZE (a positive integer)")
    return name, int(size)


def _parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.split(",") if d.strip())
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d < 1 for d in shape):
        raise OptionError(f"--input-shape '{text}' must be NAME=D1,D2,... (positive integers)")
    return name, shape


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run and time an exported library on a device over TVM RPC",
        description="Upload the library to an RPC server (or a tracker's server under --key), "
        "time main() there and compare its output with a local reference run (when the "
        "library is built for this machine). The inputs are random data of the shapes and "
        "dtypes compile wrote next to the library (LIB.json), or of --input-shape.",
    )
    p.add_argument("artifact", help="exported library (.so or .tar)")
    p.add_argument("--rpc", required=True, metavar="HOST:PORT", help="RPC server or tracker")
    p.add_argument("--key", help="tracker key of the device (then --rpc is the tracker)")
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=D1,D2,...",
        help="shape of each input of main, in order (repeatable; default: the signature "
        "compile wrote next to the library; random data, float32 unless it says otherwise)",
    )
    p.add_argument("--repeat", type=int, default=10, help="timed repeats (default 10)")
    p.add_argument("--number", type=int, default=10, help="runs per repeat (default 10)")
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long each step on the device (connect, upload, load, run) may go "
        "unanswered before bench gives up (default 60; the timing gets its expected "
        "duration on top)",
    )
    p.add_argument(
        "--reference",
        metavar="HOST_LIB",
        help="the same model built for this machine (e.g. compile --target x86-host): its "
        "output is the reference for an artifact built for another architecture",
    )
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .errors import ModelError
    from .targets.artifact import read_signature, signature_path
    from .targets.rpc import (
        bench,
        default_inputs,
        is_host_artifact,
        local_outputs,
        signature_inputs,
    )
    from .targets.tune import parse_tracker

    host, port = parse_tracker(args.rpc)
    if not args.timeout > 0:
        raise OptionError(f"--timeout {args.timeout:g} must be > 0 seconds")
    if not Path(args.artifact).is_file():
        raise ModelError(f"artifact {args.artifact}: no such file")
    if args.input_shape:
        shapes = dict(_parse_shape(s) for s in args.input_shape)
        dtypes = None
        if signature_path(args.artifact).is_file():  # dtypes still come from the signature
            try:
                dtypes = {e["name"]: e["dtype"] for e in read_signature(args.artifact)}
            except ModelError as exc:
                log.warning("%s; random float32 inputs", exc)
        inputs = default_inputs(shapes, dtypes=dtypes)
    else:
        _, inputs = signature_inputs(args.artifact)
    reference = None
    if args.reference:
        if not Path(args.reference).is_file():
            raise ModelError(f"--reference {args.reference}: no such file")
        if not is_host_artifact(Path(args.reference)):
            raise OptionError(
                f"--reference {args.reference}: not a shared library built for this machine"
            )
        reference = local_outputs(args.reference, inputs)
    result = bench(
        args.artifact,
        host,
        port,
        args.key,
        inputs=inputs,
        reference=reference,
        repeat=args.repeat,
        number=args.number,
        timeout=args.timeout,
    )
    print(f"{args.artifact} on {args.rpc}" + (f" (key {args.key})" if args.key else ""))
    print(
        f"mean {result.mean_ms:.4f} ms  median {result.median_ms:.4f} ms  "
        f"std {result.std_ms:.4f} ms  over {result.repeats} repeats"
    )
    if result.output_matches is None:
        print(
            "output: not checked (no local reference for this artifact; give one with "
            "--reference HOST_LIB)"
        )
    else:
        state = "matches" if result.output_matches else "DIFFERS from"
        print(f"output {state} the local reference (max abs error {result.max_abs_error:.3g})")
    return 0 if result.output_matches is not False else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvm-qmfrg",
        description="Spectral-geometry pruning and operator substitution for Apache TVM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_analyze(sub)
    _add_prune(sub)
    _add_compare(sub)
    _add_eval(sub)
    _add_demo(sub)
    _add_compile(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return args.func(args)
    except QMFRGError as exc:
        print(f"tvm-qmfrg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tvm-qmfrg {args.command}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"tvm-qmfrg {args.command}: terminated", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(BaseException):
    """SIGTERM as an exception, so that temp files are removed on the way out."""


def _terminated(_signum, _frame) -> None:
    raise _Terminated()


if __name__ == "__main__":
    sys.exit(main())
