"""Typed messages (pydantic) and their codecs: msgpack for structures, Arrow IPC for tables."""
