"""Packed 1-bit products for inference: every sign-only scheme's layer as one binary product
on rescaled activations (``forms``), run by a compiled CPU kernel (``cpu``) or a Triton GPU
kernel (``triton_sign``) straight from the packed bits (``linear.PackedLinear``)."""
