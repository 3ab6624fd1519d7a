"""
One way for every script to stop on a user's mistake: one line that names what is wrong (the file, and the row
where there is one), no traceback, a non-zero exit. A Ctrl-C (or a scheduler's SIGTERM) ends with one line too.

    from errors import UserError, run
    raise UserError(f"{path}: not a JSON file ({e})")   # anywhere below a script's main
    if __name__ == "__main__":
        run(main)                                      # instead of main()

Only problems with what the user gave become UserError. A bug in this repository still shows its traceback.
"""
import argparse
import os
import signal
import sys
import threading
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's input (a flag, a file, a row): its message is the whole report."""


class Interrupted(Exception):
    """SIGTERM, as a scheduler sends it before killing a job: handled like Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Interrupted("terminated (SIGTERM)")


def say(line: str):
    """Print one line to stderr, once per job: under torchrun only rank 0 speaks (every rank sees the same input,
    so every rank stops with the same message)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(line, file=sys.stderr, flush=True)


def run(main, argv=None):
    """Call main(argv). A UserError prints 'error: ...' and exits 1; Ctrl-C or SIGTERM prints 'interrupted' and
    exits 130 (the shell's code for SIGINT). A KeyboardInterrupt raised inside main may carry its own message
    (train.py says where it stopped and how to continue)."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return main(argv)
    except UserError as e:
        say(f"error: {e}")
        sys.exit(1)
    except (KeyboardInterrupt, Interrupted) as e:
        say(str(e) or "interrupted")
        sys.exit(130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose one-line errors (usage + 'error: ...', exit 2) are printed once under torchrun."""

    def error(self, message):
        if int(os.environ.get("RANK", 0)) != 0:
            sys.exit(2)
        super().error(message)


@contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM wait until the block ends (a checkpoint being written is finished first), then act as
    usual. Signal handlers belong to the main thread; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if got:
        raise KeyboardInterrupt() if got[0] == signal.SIGINT else Interrupted("terminated (SIGTERM)")
