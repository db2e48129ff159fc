"""The custodian's web page (`fedpod pod ui`, `fedpod pod start --ui`)."""
