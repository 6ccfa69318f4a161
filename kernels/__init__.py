"""Triton kernels of nft_fast, installed as ``nft_fast.kernels``.

Each kernel file is named after its op (``masked_bn.py`` <-> ``nft_fast/ops/masked_bn.py``).
Importing this package never imports triton; kernel modules do, lazily.
"""
