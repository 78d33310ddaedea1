"""The largest sizes a model config accepts (wider or larger than these is a typo, and
would be refused by the allocator only after minutes)."""

MAX_WIDTH = 65536
"""Hidden units or channels of any net."""

MAX_SIDE = 8192
"""Channels, height or width of an image."""

MAX_LEVELS = 65536
"""Quantization levels of image data (16 bits)."""

MAX_CLASSES = 100_000
"""Classes of a class-conditional model."""
