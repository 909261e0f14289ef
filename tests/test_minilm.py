"""all-MiniLM-L6-v2 (real pretrained weights): ONNX graph and TVM build match numpy float64."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from helpers import HOST
from tvm import relax
from tvm_qmfrg.passes import export_onnx, prune_module
from tvm_qmfrg.passes.importer import import_onnx

from tvm_qmfrg.errors import OptionError
from tvm_qmfrg.onnxio import minilm

SEQ = 64
TOL = 1e-4


@pytest.fixture(scope="module")
def weights():
    return minilm.load_weights()


@pytest.fixture(scope="module")
def batch():
    """A paraphrase pair and an unrelated sentence, tokenized to (3, SEQ)."""
    sentences = minilm.load_sentences()
    i, j = minilm.paraphrase_pairs()[0]
    other = sentences.index("We ordered pizza because nobody wanted to cook.")
    return minilm.tokenize([sentences[i], sentences[j], sentences[other]], seq_len=SEQ)


@pytest.fixture(scope="module")
def reference(weights, batch):
    return minilm.reference_embeddings(weights, *batch)


@pytest.fixture(scope="module")
def model(weights):
    return minilm.build_onnx(weights, seq_len=SEQ)


def test_tokenize_is_bert_uncased_fixed_length(batch):
    ids, mask = batch
    assert ids.dtype == mask.dtype == np.int64
    assert ids.shape == mask.shape == (3, SEQ)
    lengths = mask.sum(axis=1)
    assert np.all(ids[:, 0] == 101)  # [CLS]
    assert np.all(ids[np.arange(3), lengths - 1] == 102)  # [SEP]
    assert np.all(ids[mask == 0] == 0)  # [PAD]
    upper, _ = minilm.tokenize(["THE CAT"], seq_len=8)
    lower, _ = minilm.tokenize(["the cat"], seq_len=8)
    assert np.array_equal(upper, lower)


def test_onnx_graph_is_valid_and_shaped(model):
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    inputs = {i.name: i for i in model.graph.input}
    assert set(inputs) == {"input_ids", "attention_mask"}
    dims = inputs["input_ids"].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == SEQ
    assert [o.name for o in model.graph.output] == ["embedding"]
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert inits["l0.q.weight"] == (384, 384)
    assert inits["l5.ffn_in.weight"] == (384, 1536)
    assert inits["l5.ffn_out.weight"] == (1536, 384)
    names = minilm.producer_names(model)
    assert len(names) == 36
    assert names[:6] == ["l0.q", "l0.k", "l0.v", "l0.o", "l0.ffn_in", "l0.ffn_out"]


def test_onnxruntime_matches_numpy(model, batch, reference):
    ids, mask = batch
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    assert out.shape == (3, 384) and out.dtype == np.float32
    assert np.abs(out - reference).max() < TOL
    assert np.allclose(np.linalg.norm(reference, axis=1), 1.0)  # the real pipeline normalizes


def test_tvm_build_matches_numpy(model, batch, reference):
    ids, mask = batch
    mod = import_onnx(model, shape_dict={"input_ids": [3, SEQ], "attention_mask": [3, SEQ]})
    vm = relax.VirtualMachine(tvm.compile(mod, target=HOST), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(ids), tvm.runtime.tensor(mask)).numpy()
    assert out.shape == (3, 384)
    assert np.abs(out - reference).max() < TOL


def test_paraphrases_are_closer_than_unrelated(reference):
    cos = reference @ reference.T  # unit vectors
    assert cos[0, 1] > cos[0, 2] + 0.2
    assert cos[0, 1] > cos[1, 2] + 0.2


def test_unnormalized_reference_is_the_mean_pooled_vector(weights, batch, reference):
    raw = minilm.reference_embeddings(weights, *batch, normalize=False)
    assert np.all(np.linalg.norm(raw, axis=1) > 1.0)
    assert np.allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), reference)


def test_sentence_file_and_pairs():
    sentences = minilm.load_sentences()
    assert all(sentences)
    assert len(set(sentences)) == len(sentences) >= 300
    pairs = minilm.paraphrase_pairs()
    assert len(pairs) >= 40
    assert len(set(pairs)) == len(pairs)
    for i, j in pairs:
        assert 0 <= i < len(sentences) and j == i + 1


def test_pruned_encoder_exports_to_onnx_and_matches_tvm(model, batch):
    """The FFN-pruned real encoder (gather, masks, GELU, L2 norm) round-trips through ONNX."""
    ids, mask = batch
    mod = import_onnx(model, shape_dict={"input_ids": [3, SEQ], "attention_mask": [3, SEQ]})
    names = minilm.producer_names(model)
    plan, pruned = prune_module(mod, sparsity=0.3, protect=["*.q"], names=names)
    ffn_in = pruned_weight_shapes(pruned)
    assert (384, 1076) in ffn_in and (384, 1536) not in ffn_in
    assert "R.nn.gelu(" in pruned.script() and "R.erf(" not in pruned.script()
    vm = relax.VirtualMachine(tvm.compile(pruned, target=HOST), tvm.cpu())
    ours = vm["main"](tvm.runtime.tensor(ids), tvm.runtime.tensor(mask)).numpy()
    exported = export_onnx(pruned)
    onnx.checker.check_model(exported)
    sess = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    theirs = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    assert np.abs(ours - theirs).max() < TOL


def pruned_weight_shapes(mod) -> list[tuple[int, ...]]:
    shapes = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.matmul":
                w = v.args[1]
                if isinstance(w, tvm.ir.GenericConst):
                    shapes.append(tuple(w.value.shape))
    return shapes


def test_packed_calibration_tokens_have_no_padding():
    sentences = minilm.load_calibration_sentences()
    assert len(set(sentences)) == len(sentences) >= 300
    assert not set(sentences) & set(minilm.load_sentences())  # kept apart from evaluation
    ids, mask = minilm.packed_tokens(sentences, 32)
    assert ids.shape == mask.shape and ids.shape[1] == 32 and ids.shape[0] > 100
    assert np.all(mask == 1) and np.all(ids[:, 0] == minilm.CLS) and not np.any(ids == 0)
    assert np.sum(ids == 102) >= len(sentences) - 2  # one [SEP] per sentence (tail dropped)
    with pytest.raises(OptionError, match="do not fill one row"):
        minilm.packed_tokens(["a"], 32)
