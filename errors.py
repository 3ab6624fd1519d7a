"""
One way for every script to stop on a user's mistake: one line that names what is wrong (the file, and the row
where there is one), no traceback, a non-zero exit. A Ctrl-C (or a scheduler's SIGTERM) ends with one line too.

    from errors import UserError, run
    raise UserError(f"{path}: not a JSON file ({e})")   # anywhere below a script's main
    if __name__ == "__main__":
        run(main)                                      # instead of main()

Only problems with what the user gave become UserError. A bug in this repository still shows its traceback.
"""
import os
import signal
import sys


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


def run(main, argv=None, interrupted_hint: str = ""):
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
        say(str(e) if str(e) else f"interrupted{interrupted_hint}")
        sys.exit(130)
