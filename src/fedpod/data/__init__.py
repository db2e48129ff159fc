"""Datasets a pod serves (CSV, Parquet, SQLite, PostgreSQL) and the synthetic hospitals."""
