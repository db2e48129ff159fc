"""`python -m fedpod.cli ...`: the `fedpod` command, for a process started without the script."""

import os

from fedpod.cli.entry import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")
main()
