"""The quiet Ctrl-C handler, installed by the console entry point before anything heavy loads
and by `cli.main` when it is called directly. Imports nothing but the standard library."""

import os


def quit_on_signal(signum, _frame) -> None:
    """Ctrl-C outside extraction's own handler (e.g. while torch loads): a quiet exit 130, at
    once. Raising SystemExit here is not enough: a signal landing inside torch's C-level import
    gets the exception swallowed or turned into an abort. Nothing is lost: every write of a
    cache is atomic, and a lock left behind by a dead process is taken over."""
    os.write(2, b"\ninterrupted\n")
    os._exit(128 + signum)
