"""The console entry point: nothing is imported before the Ctrl-C guard is in place, so an
interrupt while torch or typer load exits 130 quietly instead of printing a traceback."""

import sys


def main() -> None:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    cli_main()
