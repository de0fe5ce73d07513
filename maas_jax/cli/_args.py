"""argparse value types shared by the commands: numbers checked where they are parsed, so a bad
value is a usage error naming the option, not a traceback."""

from __future__ import annotations

import argparse
from typing import Any


def positive(kind: type, *, zero_ok: bool = False) -> Any:
    """An argparse ``type=``: ``kind(text)``, which must be > 0 (or >= 0 with ``zero_ok``)."""

    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (v >= 0 if zero_ok else v > 0) or v != v:
            need = "non-negative" if zero_ok else "positive"
            raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}")
        return v

    return parse
