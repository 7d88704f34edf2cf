"""Triton kernels of the `dgserve` ops (see worker/ops/triton_kernels.py)."""
