"""Inference: one Decoder interface, the torch decoder, the torch-free CPU engine (cpu/), sampling, generate, bench."""
