"""Triton kernels behind ``backend="triton"``. Importing any module here imports Triton.

Kernels read inputs in their own dtype and compute in fp32, matching the torch reference up to the
order of floating-point sums. Under ``TRITON_INTERPRET=1`` they run on CPU tensors in Triton's
interpreter; set the variable before the first kernel call, because Triton reads it when a kernel
module is imported.
"""
