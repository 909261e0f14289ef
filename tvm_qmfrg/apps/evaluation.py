"""Accuracy versus FLOPs of pruning criteria on the shipped digits ResNet, through TVM.

For every (criterion, FLOPs reduction) cell the model is pruned once (the plan is shape
independent), compiled for the host with TVM and measured: accuracy on the test split and on
a seeded augmented copy of it, achieved FLOPs and parameters (counted on the module), and the
batch-1 latency of the untuned build. Criteria named ``<name>+cal`` run in data-aware mode,
refit on training images (never the test split). ``random`` runs once per seed.

How the FLOPs budget is allocated across layers is fixed by ``allocations``: one name
(default ``uniform``, the same fraction of every group: every criterion then prunes to the
same layer widths and only *which* channels go differs), or several, of which each cell
keeps the one with the best validation accuracy (the test split and its augmented copy are
measured only for the chosen plan). Choosing among several favours ``random``: a second
allocation is a second random draw, so the choice is a best-of-n on the validation split.

TVM is imported inside the functions: ``import tvm_qmfrg`` stays TVM-free.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import tvm
from tvm import relax

from tvm_qmfrg import criteria as criteria_registry
from tvm_qmfrg.apps.datasets import augmented_copy, load_digits_splits
from tvm_qmfrg.errors import OptionError
from tvm_qmfrg.passes.flops import module_cost
from tvm_qmfrg.passes.importer import import_onnx
from tvm_qmfrg.passes.prune import apply_plan, prune_module
from tvm_qmfrg.report import format_table

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 256


@dataclass(frozen=True)
class Cell:
    criterion: str
    seed: int
    target: float
    allocation: str
    flops_reduction: float
    params: int
    validation_accuracy: float
    test_accuracy: float
    augmented_accuracy: float
    latency_ms: float


def host_vm(mod):

    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
    return relax.VirtualMachine(ex, tvm.cpu())


def accuracy(vm, x: np.ndarray, y: np.ndarray, batch: int) -> float:

    correct = 0
    for i in range(0, len(x), batch):
        chunk = x[i : i + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        logits = vm["main"](tvm.runtime.tensor(chunk)).numpy()[: batch - pad]
        correct += int(np.sum(logits.argmax(axis=1) == y[i : i + batch]))
    return correct / len(x)


def latency_ms(vm, shape: tuple[int, ...], repeat: int = 5) -> float:

    x = tvm.runtime.tensor(np.zeros(shape, dtype=np.float32))
    timer = vm.time_evaluator("main", tvm.cpu(), number=10, repeat=repeat)
    return float(timer(x).median * 1e3)


def evaluate_digits(
    model_path: str,
    reductions: Sequence[float],
    criteria: Sequence[str],
    *,
    seeds: int = 3,
    allocations: Sequence[str] = ("auto",),
    ablations: Sequence[str] = (),
    ablation_reductions: Sequence[float] = (),
    batch: int = 120,
    progress: Callable[[str], None] | None = None,
) -> list[Cell]:
    """Run the grid; ``progress`` receives one line per finished cell. ``ablations``
    (``qmfrg+cal-X`` variants) run at ``ablation_reductions`` only."""

    if any(not 0 <= r < 1 for r in reductions):
        raise OptionError(f"FLOPs reductions {list(reductions)} must lie in [0, 1)")
    data = load_digits_splits(0)
    x_aug, y_aug = augmented_copy(data.x_test, data.y_test, copies=10, seed=0)
    calib = data.x_train[:CALIBRATION_IMAGES]
    model = onnx.load(model_path)
    mod_batch = import_onnx(model, {"input": [batch, 1, 8, 8]})
    mod_one = import_onnx(model, {"input": [1, 1, 8, 8]})
    mod_cal = import_onnx(model, {"input": [CALIBRATION_IMAGES, 1, 8, 8]})
    cells = []

    def measure(criterion, seed, target, allocation, plan, vm, val, flops, params):
        t0 = time.perf_counter()
        one = apply_plan(mod_one, plan) if plan else mod_one
        cell = Cell(
            criterion=criterion,
            seed=seed,
            target=target,
            allocation=allocation,
            flops_reduction=flops,
            params=params,
            validation_accuracy=val,
            test_accuracy=accuracy(vm, data.x_test, data.y_test, batch),
            augmented_accuracy=accuracy(vm, x_aug, y_aug, batch),
            latency_ms=latency_ms(host_vm(one), (1, 1, 8, 8)),
        )
        cells.append(cell)
        if progress:
            progress(
                f"{criterion:>14} seed {seed} target {target:.0%} ({allocation}): "
                f"FLOPs -{flops:.1%} val {val:.4f} test {cell.test_accuracy:.4f} "
                f"aug {cell.augmented_accuracy:.4f} ({time.perf_counter() - t0:.1f} s)"
            )

    dense_vm = host_vm(mod_batch)
    dense_val = accuracy(dense_vm, data.x_val, data.y_val, batch)
    measure("dense", 0, 0.0, "-", None, dense_vm, dense_val, 0.0, _params(mod_batch))
    for target in sorted({*reductions, *ablation_reductions}):
        variants = list(criteria) if target in reductions else []
        variants += list(ablations) if target in ablation_reductions else []
        for name in variants:
            base, calibrated = criteria_registry.variant(name)
            for seed in criteria_registry.seeds_for(name, seeds):
                tried = []
                for allocation in allocations:
                    extra = criteria_registry.variant_options(name)
                    if "allocation" not in extra:
                        extra["allocation"] = allocation
                    plan, _ = prune_module(
                        mod_cal if calibrated else mod_batch,
                        criterion=base,
                        flops_reduction=target,
                        seed=seed,
                        calibration=calib if calibrated else None,
                        onnx_model=model if calibrated else None,
                        **extra,
                    )
                    pruned = apply_plan(mod_batch, plan)
                    vm = host_vm(pruned)
                    val = accuracy(vm, data.x_val, data.y_val, batch)
                    tried.append((val, plan.options["allocation"], plan, vm))
                val, allocation, plan, vm = max(tried, key=lambda t: t[0])  # ties: uniform
                measure(
                    name,
                    seed,
                    target,
                    allocation,
                    plan,
                    vm,
                    val,
                    plan.flops_reduction,
                    plan.params_after,
                )
    return cells


def _params(mod) -> int:

    return module_cost(mod).params


def summary_table(cells: Sequence[Cell]) -> str:
    """Mean over seeds per (criterion, target): test / augmented accuracy, FLOPs, latency."""
    keys = sorted({(c.criterion, c.target) for c in cells}, key=lambda k: (k[1], k[0]))
    rows = []
    for crit, target in keys:
        group = [c for c in cells if (c.criterion, c.target) == (crit, target)]
        rows.append(
            [
                crit,
                f"{target:.0%}",
                f"{np.mean([c.flops_reduction for c in group]):.1%}",
                "/".join(sorted({c.allocation for c in group})),
                float(np.mean([c.validation_accuracy for c in group])),
                float(np.mean([c.test_accuracy for c in group])),
                float(np.mean([c.augmented_accuracy for c in group])),
                int(np.mean([c.params for c in group])),
                float(np.mean([c.latency_ms for c in group])),
                len(group),
            ]
        )
    return format_table(
        [
            "criterion",
            "target",
            "FLOPs -",
            "allocation",
            "val acc",
            "test acc",
            "aug acc",
            "params",
            "latency ms",
            "runs",
        ],
        rows,
    )


def cells_json(cells: Sequence[Cell]) -> list[dict]:
    return [asdict(c) for c in cells]
