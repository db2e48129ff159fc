"""Federated SQL: the read-only guard, the exact-merge rewrite, and the locked DuckDB engine."""
