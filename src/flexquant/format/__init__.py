"""Bit packing and checkpoint I/O."""
