"""The ``tvm-qmfrg`` command line. The only module that prints."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

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
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    p.set_defaults(func=_cmd_analyze)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze_operators
    from .onnx_model import default_model_path, linear_operators, load_onnx, model_name
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
    if args.json:
        write_json(args.json, analysis.to_dict())
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tvm-qmfrg",
        description="Spectral-geometry pruning and operator substitution for Apache TVM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_analyze(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except QMFRGError as exc:
        print(f"tvm-qmfrg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tvm-qmfrg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
