"""TVM side of tvm_qmfrg: Relax module passes that apply pruning and substitution plans."""
