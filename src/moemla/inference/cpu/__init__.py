"""The torch-free CPU engine: numpy decoder, numba kernels, int8 weights."""
