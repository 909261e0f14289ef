"""Train the small ResNet shipped as ``tvm_qmfrg/data/digits_resnet.onnx``.

Run from the repository root (the script puts the root on ``sys.path``)::

    python benchmarks/train_digits_resnet.py

Needs torch 2.13.0 (CPU; a training-only extra, the package's runtime never
imports torch), scikit-learn, onnx and onnxruntime. The export uses the
TorchScript exporter (``dynamo=False``), which does not need onnxscript.

Data: scikit-learn's digits, ``load_digits_splits(seed=0)`` (60/20/20 stratified).
Model: stem conv3x3(1->16)+BN+ReLU, three stages of two BasicBlocks (16, 32, 64
channels; strides 1, 2, 2; conv1x1+BN shortcut where the shape changes), global
average pooling and Linear(64->10). Training is seeded and deterministic: SGD
with Nesterov momentum and a cosine learning-rate schedule, each epoch on the
clean training split plus a fresh ``augmented_copy`` of it (+-1 pixel shifts,
small noise). The checkpoint is picked on the validation split only.

Outputs (each written atomically):

* ``tvm_qmfrg/data/digits_resnet.onnx``: opset 17, eval mode, input ``input``
  of shape [batch, 1, 8, 8] (batch dynamic), output ``logits`` [batch, 10];
  BatchNormalization nodes are kept, not folded into the convolutions, because
  the pruning toolkit reads their statistics.
* ``tvm_qmfrg/data/digits_resnet.json``: the metadata, with accuracies measured
  by running the exported ONNX file in onnxruntime.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn import functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tvm_qmfrg.apps.datasets import DigitsSplits, augmented_copy, load_digits_splits  # noqa: E402

DATA_DIR = REPO_ROOT / "tvm_qmfrg" / "data"
ONNX_PATH = DATA_DIR / "digits_resnet.onnx"
JSON_PATH = DATA_DIR / "digits_resnet.json"
COMMAND = "python benchmarks/train_digits_resnet.py"

SPLIT_SEED = 0
TORCH_SEED = 0
EPOCHS = 40
BATCH_SIZE = 64
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
OPSET = 17
EVAL_BATCH = 256
MAX_ONNX_BYTES = 5 * 1024 * 1024
EXPECTED_OPS = frozenset(
    {"Conv", "BatchNormalization", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm"}
)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, ReLU after the add."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """ResNet for 1x8x8 inputs: 16/32/64 channels, two BasicBlocks per stage."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        in_ch = 16
        for out_ch, stride in ((16, 1), (32, 2), (64, 2)):
            blocks += [BasicBlock(in_ch, out_ch, stride), BasicBlock(out_ch, out_ch, 1)]
            in_ch = out_ch
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Return (accuracy, mean cross-entropy) of ``model`` in eval mode."""
    model.eval()
    with torch.no_grad():
        logits = torch.cat(
            [model(torch.from_numpy(x[i : i + EVAL_BATCH])) for i in range(0, len(x), EVAL_BATCH)]
        )
        target = torch.from_numpy(y)
        loss = F.cross_entropy(logits, target).item()
        acc = (logits.argmax(1) == target).float().mean().item()
    return acc, loss


def train(splits: DigitsSplits) -> tuple[DigitsResNet, int, float]:
    """Train; return the best-on-validation model, its epoch (1-based) and val accuracy."""
    torch.manual_seed(TORCH_SEED)
    torch.use_deterministic_algorithms(True)
    model = DigitsResNet()
    opt = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    gen = torch.Generator().manual_seed(TORCH_SEED)

    best_key, best_state, best_epoch, best_acc = None, None, 0, 0.0
    for epoch in range(1, EPOCHS + 1):
        x_aug, y_aug = augmented_copy(splits.x_train, splits.y_train, copies=1, seed=1000 + epoch)
        x = torch.from_numpy(np.concatenate([splits.x_train, x_aug]))
        y = torch.from_numpy(np.concatenate([splits.y_train, y_aug]))
        model.train()
        total = 0.0
        for idx in torch.randperm(len(x), generator=gen).split(BATCH_SIZE):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        val_acc, val_loss = evaluate(model, splits.x_val, splits.y_val)
        print(
            f"epoch {epoch:3d}  train_loss {total / len(x):.4f}  "
            f"val_acc {val_acc:.4f}  val_loss {val_loss:.4f}",
            flush=True,
        )
        key = (val_acc, -val_loss)
        if best_key is None or key >= best_key:
            best_key, best_epoch, best_acc = key, epoch, val_acc
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return model, best_epoch, best_acc


def _split_shared_initializers(proto: onnx.ModelProto) -> None:
    """Give every parameter its own initializer, in place.

    The exporter stores equal-valued parameters once and aliases the others
    through Identity nodes. That happens here: in a downsampling block the
    biases of ``bn2`` and of the shortcut BN get identical gradients, so they
    stay equal. Each such Identity is replaced by a copy of its initializer.
    """
    inits = {init.name: init for init in proto.graph.initializer}
    kept = []
    for node in proto.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            alias = onnx.TensorProto()
            alias.CopyFrom(inits[node.input[0]])
            alias.name = node.output[0]
            proto.graph.initializer.append(alias)
        else:
            kept.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)


def export_onnx(model: nn.Module, path: Path) -> onnx.ModelProto:
    """Export ``model`` (eval mode, BN kept) to ``path`` atomically; return the checked model."""
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # dynamo=False is deliberate: the TorchScript exporter gives the plain
            # Conv/BatchNormalization/... graph the pruning toolkit expects.
            warnings.filterwarnings(
                "ignore", "You are using the legacy TorchScript", DeprecationWarning
            )
            torch.onnx.export(
                model,
                (torch.zeros(1, 1, 8, 8),),
                tmp,
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                training=torch.onnx.TrainingMode.EVAL,
                # Constant folding in EVAL mode fuses BN into the preceding Conv.
                do_constant_folding=False,
            )
        proto = onnx.load(tmp)
        _split_shared_initializers(proto)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, tmp)
        ops = {node.op_type for node in proto.graph.node}
        if ops != EXPECTED_OPS:
            raise RuntimeError(f"unexpected ONNX op types {sorted(ops)}")
        if os.path.getsize(tmp) > MAX_ONNX_BYTES:
            raise RuntimeError(f"ONNX file is {os.path.getsize(tmp)} bytes, over the limit")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return proto


def onnx_accuracy(session: ort.InferenceSession, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the exported model under onnxruntime."""
    preds = np.concatenate(
        [
            session.run(["logits"], {"input": x[i : i + EVAL_BATCH]})[0].argmax(1)
            for i in range(0, len(x), EVAL_BATCH)
        ]
    )
    return float((preds == y).mean())


def write_json_atomic(obj: dict, path: Path) -> None:
    """Write ``obj`` as indented JSON to ``path`` via a temp file and os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main() -> None:
    splits = load_digits_splits(seed=SPLIT_SEED)
    start = time.perf_counter()
    model, best_epoch, torch_val_acc = train(splits)
    print(
        f"trained {EPOCHS} epochs in {time.perf_counter() - start:.1f} s; "
        f"best epoch {best_epoch} (val_acc {torch_val_acc:.4f})"
    )

    export_onnx(model, ONNX_PATH)
    session = ort.InferenceSession(str(ONNX_PATH), providers=["CPUExecutionProvider"])
    x_aug, y_aug = augmented_copy(splits.x_test, splits.y_test, copies=10, seed=0)
    meta = {
        "model": ONNX_PATH.name,
        "dataset": "sklearn digits",
        "split_seed": SPLIT_SEED,
        "train_size": len(splits.y_train),
        "val_size": len(splits.y_val),
        "test_size": len(splits.y_test),
        "val_accuracy": onnx_accuracy(session, splits.x_val, splits.y_val),
        "test_accuracy": onnx_accuracy(session, splits.x_test, splits.y_test),
        "test_augmented_accuracy": onnx_accuracy(session, x_aug, y_aug),
        "test_augmented": {"copies": 10, "seed": 0},
        "epochs": EPOCHS,
        "selected_epoch": best_epoch,
        "params": sum(p.numel() for p in model.parameters()),
        "opset": OPSET,
        "onnx_sha256": hashlib.sha256(ONNX_PATH.read_bytes()).hexdigest(),
        "torch_version": torch.__version__,
        "command": COMMAND,
    }
    write_json_atomic(meta, JSON_PATH)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
