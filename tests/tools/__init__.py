"""Checks by other tools: the kernels under AddressSanitizer, Triton launches compiled for sm_80/sm_90."""
