"""Deployment targets of tvm_qmfrg: per-board configs, tuning, export and RPC benchmarking."""
