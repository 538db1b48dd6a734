"""Data: find, decode and batch images."""
