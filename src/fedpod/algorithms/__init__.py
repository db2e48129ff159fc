"""Algorithms that run at pods (and the pure halves that run at the modeller)."""
