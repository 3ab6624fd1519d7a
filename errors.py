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


# ---------------------------------------------------------------------------------------------------------------
# reading the user's files: every failure is one UserError naming the file (and the line, where text has one)


class BadValue(UserError, ValueError):
    """A UserError that is also a ValueError: what the readers raised before, so library callers that catch
    ValueError keep working."""


class NotFound(UserError, FileNotFoundError):
    """A UserError that is also a FileNotFoundError."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def file_error(path: str, e: BaseException, what: str = "cannot read it") -> UserError:
    """The one-line UserError for exception e raised while reading path; what says what the file failed to be
    ("not a safetensors file") when e is the parser's own error."""
    if isinstance(e, UserError):
        return e
    if isinstance(e, FileNotFoundError):
        return NotFound(f"{path}: no such file")
    if isinstance(e, IsADirectoryError):
        return BadValue(f"{path}: is a directory, not a file")
    if isinstance(e, PermissionError):
        return BadValue(f"{path}: permission denied")
    if isinstance(e, OSError) and e.strerror:
        return BadValue(f"{path}: cannot read it ({e.strerror})")
    if isinstance(e, RecursionError):
        return BadValue(f"{path}: {what} (nested too deeply)")
    return BadValue(f"{path}: {what} ({_first_line(e)})")


def read_text(path: str) -> str:
    """A UTF-8 text file; bytes that are not UTF-8 are reported with their line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise file_error(path, e) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise BadValue(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}: "
                       f"{e.reason})") from None


def parse_json(text: str, where: str, kind: type = dict, error: type = BadValue):
    """json.loads(text) whose top level is a kind (dict or list), or one error (of the class given) naming where
    the text came from: a file, or a file and line."""
    import json
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        at = f"line {e.lineno}, column {e.colno}" if "\n" in text else f"column {e.colno}"
        raise error(f"{where}: not valid JSON ({e.msg} at {at})") from None
    except RecursionError:
        raise error(f"{where}: not valid JSON (nested too deeply)") from None
    if not isinstance(obj, kind):
        want = {dict: "an object {...}", list: "a list [...]"}.get(kind, kind.__name__)
        raise error(f"{where}: the top level must be {want}, not {type(obj).__name__}")
    return obj


def read_json(path: str, kind: type = dict):
    """A JSON file whose top level is a kind (dict or list), or one UserError naming the file."""
    return parse_json(read_text(path), path, kind)


def json_lines(text: str, path: str, error: type = BadValue) -> list[dict]:
    """The objects of JSON-lines text, one per non-blank line, each error naming path:line. Split at "\n" only
    (splitlines would also split at U+2028 and other separators that may stand unescaped inside a JSON string)."""
    return [parse_json(line, f"{path}:{n}", dict, error) for n, line in enumerate(text.split("\n"), 1)
            if line.strip()]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the script's docstring as written and each optional flag's default."""

    def _get_help_string(self, action):
        return f"{action.help} (required)" if action.required else super()._get_help_string(action)


def field_comments(cls) -> dict:
    """{field: its trailing comment} read from a dataclass's source (`name: type = default  # comment`): the
    dataclass is --help's one source."""
    import inspect
    import re
    return {m[1]: m[2] for m in re.finditer(r"^    (\w+): [^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M)}
