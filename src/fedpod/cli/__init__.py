"""The `fedpod` command line (typer + rich)."""
