"""The CUDA emulator (nft_fast._cuda_emu, csrc/testing/cuda_emu/), a test tool: its self-tests,
schedule checks and race checker."""
