"""Identities (signing + encryption keys), the keystore, and signed, encrypted envelopes."""
