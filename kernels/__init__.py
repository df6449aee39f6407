"""Triton kernels of turbokernels, one file per op family (configs -> @triton.jit kernel -> launcher).

Importing this package does not import triton; each op's backend table imports its kernel file lazily.
"""
