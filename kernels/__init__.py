"""Triton kernels and their chunked PyTorch forms, installed as `hscr_fast.kernels`."""
