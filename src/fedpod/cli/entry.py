"""The `fedpod` command: `pod start` runs the lean one-command app (`cli.pod_start`), which
keeps the rest of the command line out of a long-running pod's memory; everything else runs the
full app (`cli.app`). Every error is one clean line (its text never read as markup); `--debug` or
FEDPOD_DEBUG=1 shows the traceback instead."""

from __future__ import annotations

import os
import sys


def main() -> None:
    debug = "--debug" in sys.argv[1:] or os.environ.get("FEDPOD_DEBUG", "") not in ("", "0")
    if "--debug" in sys.argv[1:]:
        sys.argv.remove("--debug")
    try:
        if sys.argv[1:3] == ["pod", "start"]:
            from fedpod.cli.pod_start import app as pod_start_app

            pod_start_app(args=sys.argv[3:], prog_name="fedpod pod start")
        else:
            from fedpod.cli.app import app

            app()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:
        if debug:
            raise
        from rich.console import Console
        from rich.markup import escape

        from fedpod.errors import FedpodError, plain

        err = Console(stderr=True)
        text = str(exc) if isinstance(exc, FedpodError) else plain(f"unexpected {type(exc).__name__}: {exc}")
        err.print(f"[red]error:[/red] {escape(text)}", highlight=False)
        if not isinstance(exc, FedpodError):
            err.print("[dim]run with --debug (or FEDPOD_DEBUG=1) for the traceback[/dim]", highlight=False)
        raise SystemExit(1) from None
