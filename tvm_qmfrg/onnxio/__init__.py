"""ONNX side of the toolkit: preparing exporters' models for TVM (onnx only, no TVM)."""
