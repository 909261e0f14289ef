"""A corpus of small ONNX models that reproduce the graph idioms real exporters write.

Every model is built with ``onnx.helper`` and seeded numpy weights only (no framework, no
download): see :mod:`idioms` for the builders and the ``CORPUS`` registry.
"""
