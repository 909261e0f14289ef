"""`prune` / `compile` with --calibration, --preprocess and --validate on the shipped model,
and the validation metric (`onnxio.validate.fidelity`) on small ONNX models."""

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from tvm_qmfrg.apps.datasets import load_digits_splits
from tvm_qmfrg.cli import main
from tvm_qmfrg.onnxio.reader import default_model_path
from tvm_qmfrg.onnxio.validate import COSINE, TOP1, Fidelity, describe, fidelity

MODEL = default_model_path()
VALIDATION = re.compile(
    r"^validation \((\d+) samples, ([^)]*)\): (top-1 agreement|mean cosine) with the dense "
    r"model (-?[0-9.]+)$",
    re.M,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits_splits(0)


def run_cli(capsys, *args):
    code = main(["prune", MODEL, *args])
    out, err = capsys.readouterr()
    return code, out, err


def first_outputs(path_or_model, x):
    """The model's first output per sample, one sample at a time (the pruned model is the
    prepared graph: static batch 1)."""
    model = path_or_model if isinstance(path_or_model, str) else path_or_model.SerializeToString()
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])


def printed_validation(out):
    found = VALIDATION.findall(out)
    assert len(found) == 1, out
    n, seen, metric, value = found[0]
    return int(n), seen, metric, float(value)


def write_pngs(folder, images):
    folder.mkdir()
    for i, x in enumerate(images):
        pixels = np.rint(x[0] * 255).astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / f"{i:03d}.png")
    return folder


def test_prune_with_calibration_and_validation_writes_the_model_it_validated(
    tmp_path, capsys, digits
):
    np.savez(tmp_path / "cal.npz", input=digits.x_train[:48])
    np.savez(tmp_path / "val.npz", input=digits.x_test[:40])
    out_path = tmp_path / "pruned.onnx"
    code, out, err = run_cli(
        capsys,
        "--flops-reduction",
        "0.3",
        "--calibration",
        str(tmp_path / "cal.npz"),
        "--validate",
        str(tmp_path / "val.npz"),
        "-o",
        str(out_path),
    )
    assert code == 0, err
    assert f"loaded 48 calibration samples from {tmp_path / 'cal.npz'}" in out
    assert f"loaded 40 validation samples from {tmp_path / 'val.npz'}" in out
    n, seen, metric, value = printed_validation(out)
    assert (n, seen, metric) == (40, "not seen by the pass", "top-1 agreement")
    assert 0.0 <= value <= 1.0
    lines = out.splitlines()
    assert (
        lines.index(f"wrote pruned model {out_path}")
        > [i for i, line in enumerate(lines) if line.startswith("validation (")][0]
    )
    x = digits.x_test[:40]
    dense = first_outputs(onnx.load(MODEL), x)
    pruned = first_outputs(str(out_path), x)
    agreement = float(np.mean(dense.argmax(axis=1) == pruned.argmax(axis=1)))
    assert abs(agreement - value) < 5e-4


def test_validation_alone_checks_data_free_pruning_and_writes_nothing(tmp_path, capsys, digits):
    np.save(tmp_path / "val.npy", digits.x_test[:12])
    code, out, err = run_cli(capsys, "--sparsity", "0.2", "--validate", str(tmp_path / "val.npy"))
    assert code == 0, err
    assert "calibration samples" not in out
    n, seen, metric, value = printed_validation(out)
    assert (n, seen, metric) == (12, "not seen by the pass", "top-1 agreement")
    assert 0.0 <= value <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.npy"]


def test_a_folder_of_png_digits_calibrates_and_validates_with_preprocess(tmp_path, capsys, digits):
    folder = write_pngs(tmp_path / "digits", digits.x_train[:24])
    out_path = tmp_path / "pruned.onnx"
    code, out, err = run_cli(
        capsys,
        "--flops-reduction",
        "0.2",
        "--calibration",
        str(folder),
        "--preprocess",
        "scale=1/255",
        "--validate",
        str(folder),
        "-o",
        str(out_path),
    )
    assert code == 0, err
    assert f"loaded 24 calibration samples from {folder}" in out
    n, seen, metric, value = printed_validation(out)
    assert (n, seen, metric) == (24, "the calibration data, seen by the pass", TOP1)
    x = (np.rint(digits.x_train[:24] * 255) / 255).astype(np.float32)  # what the PNGs hold
    dense = first_outputs(onnx.load(MODEL), x)
    pruned = first_outputs(str(out_path), x)
    assert abs(np.mean(dense.argmax(axis=1) == pruned.argmax(axis=1)) - value) < 5e-4


def bad_npz(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return str(path)


def nan_samples():
    x = np.zeros((3, 1, 8, 8), np.float32)
    x[1, 0, 4, 4] = np.nan
    return x


BAD_DATA = [
    (
        lambda t: ["--calibration", str(t / "missing.npz")],
        r"--calibration .*missing\.npz: no such file or folder$",
    ),
    (
        lambda t: ["--calibration", bad_npz(t, input=np.zeros((4, 8, 8), np.float32))],
        r"--calibration .*bad\.npz: input 'input' takes samples of shape \(N, 1, 8, 8\), the "
        r"array has shape \(4, 8, 8\)$",
    ),
    (
        lambda t: ["--validate", bad_npz(t, input=nan_samples())],
        r"--validate .*bad\.npz: input 'input' holds 1 NaN/Inf value\(s\) \(as float32; first "
        r"in sample 1\)$",
    ),
    (
        lambda t: [
            "--calibration",
            bad_npz(t, input=np.zeros((2, 1, 8, 8)), labels=np.zeros(2)),
        ],
        r"--calibration .*bad\.npz: array\(s\) 'labels' name no model input",
    ),
    (
        lambda t: ["--calibration", str(write_pngs(t / "imgs", np.zeros((2, 1, 8, 8))))],
        r"--calibration .*imgs: a folder of images needs --preprocess \(e\.g\. size=224",
    ),
    (
        lambda t: [
            "--calibration",
            bad_npz(t, input=np.zeros((2, 1, 8, 8))),
            "--preprocess",
            "scale=1/255",
        ],
        r"--preprocess is for a folder of images, and --calibration .*bad\.npz is not a folder$",
    ),
    (
        lambda t: ["--preprocess", "scale=1/255"],
        r"--preprocess is for a folder of images, and no --calibration or --validate is given$",
    ),
    (
        lambda t: [
            "--calibration",
            str(write_pngs(t / "imgs", np.zeros((2, 1, 8, 8)))),
            "--preprocess",
            "size=8,crop=6",
        ],
        r"--preprocess 'size=8,crop=6': unknown key 'crop' \(keys: size, resize, channels",
    ),
    (
        lambda t: [
            "--validate",
            str(write_pngs(t / "imgs", [])),
            "--preprocess",
            "scale=1/255",
        ],
        r"--validate .*imgs: no images \(\.bmp, \.jpeg, \.jpg, \.png\) in the folder$",
    ),
    (
        lambda t: [
            "--calibration",
            str(write_pngs(t / "imgs", np.zeros((1, 1, 8, 8)))),
            "--preprocess",
            "size=6",
        ],
        r"--preprocess gives input 'input' samples of shape \(1, 6, 6\) .*the model wants "
        r"\(1, 8, 8\)$",
    ),
]


@pytest.mark.parametrize("make_args, match", BAD_DATA)
def test_bad_data_exits_1_with_one_line_and_writes_no_file(tmp_path, capsys, make_args, match):
    args = make_args(tmp_path)
    before = {p.name for p in tmp_path.iterdir()}
    out_path = tmp_path / "pruned.onnx"
    code, out, err = run_cli(
        capsys,
        "--flops-reduction",
        "0.3",
        *args,
        "-o",
        str(out_path),
        "--plan",
        str(tmp_path / "p.json"),
    )
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tvm-qmfrg prune: error: ")
    assert re.search(match, lines[0]), lines[0]
    assert "importing" not in out  # refused before the model is imported
    assert {p.name for p in tmp_path.iterdir()} == before


def test_an_unreadable_image_names_the_image_and_exits_1(tmp_path, capsys):
    folder = write_pngs(tmp_path / "imgs", np.zeros((2, 1, 8, 8)))
    (folder / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    code, _, err = run_cli(
        capsys, "--sparsity", "0.2", "--calibration", str(folder), "--preprocess", "scale=1/255"
    )
    assert code == 1
    assert re.fullmatch(
        r"tvm-qmfrg prune: error: --calibration .*imgs: cannot read image 002\.png \(.*\)\n", err
    )


@pytest.mark.parametrize("flag", ["--calibration", "--validate"])
def test_compile_refuses_data_flags_without_pruning_options(tmp_path, capsys, flag):
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 8, 8), np.float32))
    code = main(["compile", MODEL, "--target", "x86-host", flag, str(tmp_path / "x.npy")])
    _, err = capsys.readouterr()
    assert code == 1
    assert err == (
        f"tvm-qmfrg compile: error: {flag} is for pruning: give --flops-reduction, "
        "--sparsity or --epsilon\n"
    )


def test_compile_validates_the_pruned_model_before_it_builds(tmp_path, capsys, digits):
    np.savez(tmp_path / "cal.npz", input=digits.x_train[:16])
    np.save(tmp_path / "val.npy", digits.x_test[:10])
    lib = tmp_path / "model.so"
    code = main(
        [
            "compile",
            MODEL,
            "--target",
            "x86-host",
            "--sparsity",
            "0.2",
            "--calibration",
            str(tmp_path / "cal.npz"),
            "--validate",
            str(tmp_path / "val.npy"),
            "-o",
            str(lib),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "loaded 16 calibration samples" in out
    n, seen, metric, value = printed_validation(out)
    assert (n, seen, metric) == (10, "not seen by the pass", TOP1) and 0.0 <= value <= 1.0
    assert out.index("validation (") < out.index(f"wrote {lib}")
    assert lib.stat().st_size > 0


# --- the validation metric -----------------------------------------------------------------


def matmul_model(weight, in_shape, out_shape, offset=None):
    """``output = input @ weight`` (``+ offset`` when given)."""
    nodes = [helper.make_node("MatMul", ["input", "w"], ["mm"], name="mm")]
    consts = [numpy_helper.from_array(weight.astype(np.float32), "w")]
    if offset is None:
        nodes[0].output[0] = "output"
    else:
        nodes.append(helper.make_node("Add", ["mm", "offset"], ["output"], name="add"))
        consts.append(numpy_helper.from_array(offset.astype(np.float32), "offset"))
    graph = helper.make_graph(
        nodes,
        "mm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
        consts,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_top1_agreement_pads_the_last_batch_and_counts_every_sample_once():
    rng = np.random.default_rng(0)
    w_dense, w_pruned = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    x = rng.standard_normal((7, 4)).astype(np.float32)  # batches of 3: 3 + 3 + 1 (padded)
    dense = matmul_model(w_dense, [3, 4], [3, 3])
    pruned = matmul_model(w_pruned, [3, 4], [3, 3])
    (got,) = fidelity(dense, pruned, {"input": x}, batch=3)
    want = np.mean((x @ w_dense).argmax(axis=1) == (x @ w_pruned).argmax(axis=1))
    assert got == Fidelity(TOP1, pytest.approx(want), 7, output="output")
    assert fidelity(dense, dense, {"input": x}, batch=3)[0].value == 1.0


def test_outputs_that_are_not_class_scores_are_compared_by_mean_cosine():
    rng = np.random.default_rng(1)
    w_dense = rng.standard_normal((4, 3))
    w_pruned = w_dense + 0.3 * rng.standard_normal((4, 3))
    x = rng.standard_normal((5, 2, 4)).astype(np.float32)
    dense = matmul_model(w_dense, [1, 2, 4], [1, 2, 3])
    pruned = matmul_model(w_pruned, [1, 2, 4], [1, 2, 3])
    (got,) = fidelity(dense, pruned, {"input": x}, batch=1)
    a, b = (x @ w_dense).reshape(5, -1), (x @ w_pruned).reshape(5, -1)
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert got.metric == COSINE and got.samples == 5
    assert got.value == pytest.approx(cos.mean(), abs=1e-5)
    r2 = 1 - np.sum((b - a) ** 2) / np.sum((a - a.mean(axis=0)) ** 2)
    assert got.r2 == pytest.approx(r2, abs=1e-5)
    assert str(got) == f"mean cosine with the dense model {got.value:.3f}, R² {r2:.3f} (5 samples)"


def test_r2_shows_an_error_that_a_large_constant_output_hides_from_the_cosine():
    # a detector's output: a large fixed part (the box grid) beside a small one the input moves
    rng = np.random.default_rng(2)
    w_dense = rng.standard_normal((4, 3))
    w_pruned = w_dense + 0.5 * rng.standard_normal((4, 3))
    x = rng.standard_normal((6, 2, 4)).astype(np.float32)
    grid = np.full((1, 2, 3), 1000.0, np.float32)  # added by both models

    def compare(offset):
        dense = matmul_model(w_dense, [1, 2, 4], [1, 2, 3], offset=offset)
        pruned = matmul_model(w_pruned, [1, 2, 4], [1, 2, 3], offset=offset)
        return fidelity(dense, pruned, {"input": x}, batch=1)[0]

    bare, shifted = compare(None), compare(grid)
    assert bare.value < 0.99 and shifted.value > 0.9999  # the grid hides the error
    assert shifted.r2 == pytest.approx(bare.r2, abs=1e-4) and bare.r2 < 0.99  # R² does not


def test_every_output_of_a_two_headed_model_is_compared_and_named():
    rng = np.random.default_rng(4)
    w_dense = rng.standard_normal((4, 3))
    w_pruned = w_dense + 0.3 * rng.standard_normal((4, 3))
    x = rng.standard_normal((5, 4)).astype(np.float32)

    def two_heads(w):  # "scores" (5 classes) and "boxes" (one box of 3 values per sample)
        graph = helper.make_graph(
            [
                helper.make_node("MatMul", ["input", "w"], ["mm"], name="mm"),
                helper.make_node("Unsqueeze", ["mm", "axis"], ["boxes"], name="box"),
                helper.make_node("MatMul", ["input", "v"], ["scores"], name="cls"),
            ],
            "two",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
            [
                helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 5]),
                helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 1, 3]),
            ],
            [
                numpy_helper.from_array(w.astype(np.float32), "w"),
                numpy_helper.from_array(np.eye(4, 5, dtype=np.float32), "v"),
                numpy_helper.from_array(np.array([1], np.int64), "axis"),
            ],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    scores, boxes = fidelity(two_heads(w_dense), two_heads(w_pruned), {"input": x}, batch=1)
    assert (scores.output, scores.metric, scores.value) == ("scores", TOP1, 1.0)
    assert (boxes.output, boxes.metric) == ("boxes", COSINE) and boxes.value < 1.0
    assert describe([scores, boxes]) == f"scores: {scores.measure()}; boxes: {boxes.measure()}"
    assert describe([boxes]) == boxes.measure()


def test_r2_is_left_out_for_one_sample_or_an_output_that_does_not_vary():
    w = np.random.default_rng(3).standard_normal((4, 3))
    model = matmul_model(w, [1, 2, 4], [1, 2, 3])
    one = np.ones((1, 2, 4), np.float32)
    assert fidelity(model, model, {"input": one}, batch=1)[0].r2 is None
    same = np.ones((3, 2, 4), np.float32)
    (got,) = fidelity(model, model, {"input": same}, batch=1)
    assert got.r2 is None and str(got).endswith("1.000 (3 samples)")


def test_sensitivity_allocation_without_calibration_exits_1_with_one_line(capsys):
    code, _, err = run_cli(capsys, "--flops-reduction", "0.3", "--allocation", "sensitivity")
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert "sensitivity" in err and "calibration" in err
