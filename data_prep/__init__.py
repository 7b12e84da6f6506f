"""Offline data preparation: readers and converters for face-recognition datasets (no MXNet needed)."""
