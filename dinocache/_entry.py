"""The console entry point. Its first act is the Ctrl-C handler, before typer, transformers or
torch are imported, so an interrupt while they load exits 130 quietly instead of printing a
traceback (or, caught as KeyboardInterrupt half-way through an import, dying by the signal)."""

import os
import signal


def quit_on_signal(signum, _frame) -> None:
    """Ctrl-C outside extraction's own handler (e.g. while torch loads): a quiet exit 130, at
    once. Raising SystemExit here is not enough: a signal landing inside torch's C-level import
    gets the exception swallowed or turned into an abort. Nothing is lost: every write of a
    cache is atomic, and a lock left behind by a dead process is taken over."""
    os.write(2, b"\ninterrupted\n")
    os._exit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGINT, quit_on_signal)
    from .cli import main as cli_main

    cli_main()
