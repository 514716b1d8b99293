"""What every script shares: one error path, and argument types that check ranges where arguments enter.

A failure the user caused (missing, corrupt or mismatched files, bad arguments, outputs that cannot be written)
ends in one line ``error: ...`` on stderr and exit status :data:`EXIT_USER_ERROR` (2, argparse's own status for bad
arguments). A traceback means a bug in brainldm.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from brainldm.validation import MAX_SEED, InputError, oneline

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def script(main: Callable[[list[str] | None], None]) -> Callable[[list[str] | None], None]:
    """Wrap a script's ``main(argv)``: user errors become one ``error:`` line and exit status 2."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> None:
        try:
            main(argv)
        except InputError as err:
            fail(oneline(err))
        except (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError) as err:
            # the OS errors a user's path causes; other OSErrors (disk full, I/O) keep their traceback
            where = f": {err.filename}" if err.filename else ""
            fail(f"{err.strerror or oneline(err)}{where}; check the path and its permissions")
        except KeyboardInterrupt:
            print("interrupted; run the same command again to resume", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    return run


def fail(message: str) -> None:
    """Print ``error: message`` to stderr and exit with :data:`EXIT_USER_ERROR`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


# --- argparse types ------------------------------------------------------------------------------------------


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer within [minimum, maximum] ("1.5" and "1e3" are refused)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"{value} is outside {_range(minimum, maximum)}")
        return value

    return parse


def number(minimum: float | None = None, maximum: float | None = None, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float within [minimum, maximum] (``above``: strictly above minimum)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = minimum is None or (value > minimum if above else value >= minimum)
        if value != value or abs(value) == float("inf") or not low_ok or (maximum is not None and value > maximum):
            lower = "(" if above else "["
            raise argparse.ArgumentTypeError(f"{text} is outside {_range(minimum, maximum, lower)}")
        return value

    return parse


def names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names, each one of ``choices``."""

    def parse(text: str) -> list[str]:
        chosen = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in choices]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"unknown name(s) {unknown or [text]}; choose from {','.join(choices)}")
        return chosen

    return parse


def numbers(minimum: float | None = None, above: bool = False) -> Callable[[str], list[float]]:
    """An argparse type: comma-separated numbers, each as :func:`number` checks it."""
    one = number(minimum, above=above)

    def parse(text: str) -> list[float]:
        values = [one(part) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
        return values

    return parse


def integers(minimum: int | None = None) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated whole numbers, each as :func:`integer` checks it, without repeats."""
    one = integer(minimum)

    def parse(text: str) -> list[int]:
        values = list(dict.fromkeys(one(part) for part in text.split(",") if part.strip()))
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}")
        return values

    return parse


def name_values(value: Callable[[str], object], example: str = "c=1024") -> Callable[[str], dict]:
    """An argparse type: comma-separated ``name=value`` pairs, each value read by ``value`` (e.g. ``c=1024``)."""

    def parse(text: str) -> dict:
        pairs = [part.split("=") for part in text.split(",") if part.strip()]
        if not pairs or any(len(pair) != 2 or not pair[0].strip() for pair in pairs):
            raise argparse.ArgumentTypeError(f"expected name=value pairs such as {example}, got {text!r}")
        names = [name.strip() for name, _ in pairs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise argparse.ArgumentTypeError(f"{text!r} names {', '.join(repeated)} more than once")
        return {name.strip(): value(number.strip()) for name, number in pairs}

    return parse


seed = integer(0, MAX_SEED)
positive = integer(1)


def add_subjects(parser: argparse.ArgumentParser) -> None:
    """``--subjects 1,2,5,7`` (or ``--subject 1``): the subject numbers a script works over, as ``args.subjects``."""
    parser.add_argument(
        "--subjects",
        "--subject",
        dest="subjects",
        type=integers(1),
        required=True,
        help="subject number(s), comma-separated (NSD: 1-8; your own experiment: any)",
    )


def output_folder(text: str) -> Path:
    """An argparse type: a folder that can be written (existing, or creatable), checked before any work starts."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {parent}")
    return path


def _range(minimum, maximum, lower: str = "[") -> str:
    def show(value, infinity: str) -> str:
        return infinity if value is None else str(value) if isinstance(value, int) else f"{value:g}"

    return f"{lower}{show(minimum, '-inf')}, {show(maximum, 'inf')}]"


def byte_size(n_bytes: float) -> str:
    """A number of bytes as people read it: kB, MB or GB (powers of 1000)."""
    if n_bytes >= 1e9:
        return f"{n_bytes / 1e9:.1f} GB"
    return f"{n_bytes / 1e6:.0f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:.0f} kB"
