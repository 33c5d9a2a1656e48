"""The console entry point. Its first act is the Ctrl-C handler, before typer, transformers or
torch are imported, so an interrupt while they load exits 130 quietly instead of printing a
traceback (or, caught as KeyboardInterrupt half-way through an import, dying by the signal)."""

import signal

from .interrupt import quit_on_signal


def main() -> None:
    signal.signal(signal.SIGINT, quit_on_signal)
    from .cli import main as cli_main  # the entry point's one upward import, after the handler

    cli_main()
