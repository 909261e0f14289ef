"""What uses everything: the demo, the evaluation grids and their report and figures.

Each module here imports TVM, the passes and the targets at its top; the core
(``tvm_qmfrg``) never imports from here. The CLI (``tvm_qmfrg.cli``) calls one function
per command.
"""
