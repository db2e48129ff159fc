"""The custodian's rules: access decisions and the tamper-evident audit log."""
