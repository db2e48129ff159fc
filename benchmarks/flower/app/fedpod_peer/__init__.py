"""Flower's side of fedpod's benchmarks (runs inside Flower's processes, in Flower's venv)."""
