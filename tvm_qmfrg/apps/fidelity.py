"""Fidelity versus FLOPs of pruning criteria on all-MiniLM-L6-v2 (real pretrained weights).

A sentence encoder has no labels to be accurate on; what a user keeps is the geometry of the
embedding space. For every (criterion, target) cell the model is pruned with the Relax pass,
and the pruned module embeds the repo's evaluation sentences. Two numbers per cell:

- mean cosine similarity between each sentence's pruned and dense embedding;
- nearest-neighbour agreement@1: the fraction of sentences whose nearest other sentence
  (cosine) is the same in the pruned and in the dense embedding space.

Two kinds of target: ``flops`` (a fraction of the encoder's matmul FLOPs, heads and FFN
neurons pruned alike) and ``ffn`` (a fraction of the FFN neurons of every layer, heads
kept). Criteria named ``<name>+cal`` refit on the calibration text (written apart from the
evaluation sentences), packed into full rows. The embeddings are computed by ONNX Runtime on
the pruned module exported back to ONNX (the export matches TVM within 1e-4, and an untuned
TVM CPU build needs minutes per pass over the set); latency is the untuned TVM build for
this host at batch 1, in milliseconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort
import tvm

from tvm_qmfrg import criteria as criteria_registry
from tvm_qmfrg.apps.evaluation import host_vm
from tvm_qmfrg.errors import OptionError
from tvm_qmfrg.onnxio import minilm
from tvm_qmfrg.passes import apply_plan, export_onnx, prune_module
from tvm_qmfrg.passes.flops import module_cost
from tvm_qmfrg.passes.importer import import_onnx
from tvm_qmfrg.passes.normalize import normalize
from tvm_qmfrg.report import format_table

log = logging.getLogger(__name__)

SEQ_LEN = 32  # the longest evaluation sentence is 24 word pieces
CALIBRATION_BATCH = 10  # rows per onnxruntime call while collecting activations
HEADS_GLOB = "*.q"  # protects the attention-head groups (Q/K/V of a layer) in ``ffn`` mode


@dataclass(frozen=True)
class FidelityCell:
    criterion: str
    seed: int
    mode: str  # "flops" or "ffn"
    target: float
    flops_reduction: float
    params: int
    mean_cosine: float
    nn_agreement: float
    paraphrase_retrieval: float
    latency_ms: float


def nearest_neighbours(emb: np.ndarray) -> np.ndarray:
    """Index of each row's most cosine-similar other row."""
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def fidelity(pruned: np.ndarray, dense: np.ndarray) -> tuple[float, float]:
    """``(mean cosine(pruned_i, dense_i), NN agreement@1)`` of two embedding matrices."""
    num = np.sum(pruned * dense, axis=1)
    den = np.maximum(np.linalg.norm(pruned, axis=1) * np.linalg.norm(dense, axis=1), 1e-12)
    agree = nearest_neighbours(pruned) == nearest_neighbours(dense)
    return float(np.mean(num / den)), float(np.mean(agree))


def paraphrase_retrieval(emb: np.ndarray, pairs: Sequence[tuple[int, int]]) -> float:
    """Share of the sentences of the paraphrase pairs whose most cosine-similar other
    sentence (among all of them) is their partner: a task metric with the repo's labels."""
    nn = nearest_neighbours(emb)
    hits = [nn[i] == j for i, j in pairs] + [nn[j] == i for i, j in pairs]
    return float(np.mean(hits))


def _ort_embed(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, ["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]


def _latency_ms(mod, repeat: int = 3) -> float:

    vm = host_vm(mod)
    ids = tvm.runtime.tensor(np.full((1, SEQ_LEN), minilm.CLS, dtype=np.int64))
    mask = tvm.runtime.tensor(np.ones((1, SEQ_LEN), dtype=np.int64))
    timer = vm.time_evaluator("main", tvm.cpu(), number=3, repeat=repeat)
    return float(timer(ids, mask).median * 1e3)


def evaluate_minilm(
    reductions: Sequence[float],
    criteria: Sequence[str],
    *,
    ffn_sparsities: Sequence[float] = (0.5,),
    seeds: int = 3,
    ablations: Sequence[str] = (),
    ablation_reductions: Sequence[float] = (),
    progress: Callable[[str], None] | None = None,
) -> list[FidelityCell]:
    """Run the grid (``reductions`` as ``flops`` cells, ``ffn_sparsities`` as ``ffn``)."""

    if any(not 0 <= r < 1 for r in [*reductions, *ffn_sparsities]):
        raise OptionError("FLOPs reductions and FFN sparsities must lie in [0, 1)")
    weights = minilm.load_weights()
    sentences = minilm.load_sentences()
    ids, mask = minilm.tokenize(sentences, SEQ_LEN)
    cal_ids, cal_mask = minilm.packed_tokens(minilm.load_calibration_sentences(), SEQ_LEN)

    def module(batch: int):
        model = minilm.build_onnx(weights, seq_len=SEQ_LEN, batch=batch)
        shapes = {"input_ids": [batch, SEQ_LEN], "attention_mask": [batch, SEQ_LEN]}
        return model, import_onnx(model, shapes)

    model, mod_all = module(len(sentences))
    names = minilm.producer_names(model)
    _, mod_one = module(1)
    cal_model, mod_cal = module(CALIBRATION_BATCH)
    calibration = {"input_ids": cal_ids, "attention_mask": cal_mask}
    pairs = minilm.paraphrase_pairs()
    dense = _ort_embed(model, ids, mask)
    cells = []

    def record(name, seed, mode, target, plan, pruned_all):
        t0 = time.perf_counter()
        emb = dense if plan is None else _ort_embed(export_onnx(pruned_all), ids, mask)
        cos, agree = fidelity(emb, dense)
        retrieval = paraphrase_retrieval(emb, pairs)
        one = mod_one if plan is None else apply_plan(mod_one, plan, names=names)
        cell = FidelityCell(
            criterion=name,
            seed=seed,
            mode=mode,
            target=target,
            flops_reduction=0.0 if plan is None else plan.flops_reduction,
            params=module_cost(pruned_all).params,
            mean_cosine=cos,
            nn_agreement=agree,
            paraphrase_retrieval=retrieval,
            latency_ms=_latency_ms(one),
        )
        cells.append(cell)
        if progress:
            progress(
                f"minilm {name:>14} seed {seed} {mode} {target:.0%}: "
                f"FLOPs -{cell.flops_reduction:.1%} cosine {cos:.4f} NN@1 {agree:.3f} "
                f"paraphrase@1 {retrieval:.3f} "
                f"({time.perf_counter() - t0:.1f} s)"
            )

    record("dense", 0, "flops", 0.0, None, normalize(mod_all))
    flops = sorted({*reductions, *ablation_reductions})
    targets = [("flops", r) for r in flops] + [("ffn", s) for s in ffn_sparsities]
    for mode, target in targets:
        variants = list(criteria) if mode == "ffn" or target in reductions else []
        if mode == "flops" and target in ablation_reductions:
            variants += list(ablations)
        amount = (
            {"flops_reduction": target}
            if mode == "flops"
            else {"sparsity": target, "protect": [HEADS_GLOB]}
        )
        for name in variants:
            base, calibrated = criteria_registry.variant(name)
            for seed in criteria_registry.seeds_for(name, seeds):
                plan, pruned = prune_module(
                    mod_cal if calibrated else mod_all,
                    criterion=base,
                    seed=seed,
                    names=names,
                    model="all-MiniLM-L6-v2",
                    calibration=calibration if calibrated else None,
                    onnx_model=cal_model if calibrated else None,
                    **amount,
                    **criteria_registry.variant_options(name),
                )
                if calibrated:
                    pruned = apply_plan(mod_all, plan, names=names)
                record(name, seed, mode, target, plan, pruned)
    return cells


def summary_table(cells: Sequence[FidelityCell]) -> str:
    """Mean over seeds per (mode, target, criterion)."""
    keys = sorted({(c.mode, c.target, c.criterion) for c in cells})
    rows = []
    for mode, target, crit in keys:
        group = [c for c in cells if (c.mode, c.target, c.criterion) == (mode, target, crit)]
        rows.append(
            [
                crit,
                f"{mode} {target:.0%}",
                f"{np.mean([c.flops_reduction for c in group]):.1%}",
                float(np.mean([c.mean_cosine for c in group])),
                float(np.mean([c.nn_agreement for c in group])),
                float(np.mean([c.paraphrase_retrieval for c in group])),
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
            "cosine",
            "NN@1",
            "paraphrase@1",
            "params",
            "latency ms",
            "runs",
        ],
        rows,
    )


def cells_json(cells: Sequence[FidelityCell]) -> list[dict]:
    return [asdict(c) for c in cells]
