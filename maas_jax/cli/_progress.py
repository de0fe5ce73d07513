"""Progress for steps that take more than a second: a rich spinner on a terminal, else silent."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator


@contextlib.contextmanager
def step(description: str, *, stream=None) -> Iterator[None]:
    """Show ``description`` with a spinner and the elapsed time while the block runs.

    Writes nothing when ``stream`` (default stderr) is not a terminal, so logs and pipes
    stay clean.
    """
    stream = sys.stderr if stream is None else stream
    if not getattr(stream, "isatty", lambda: False)():
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    t0 = time.perf_counter()
    console = Console(file=stream)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        progress.add_task(description, total=None)
        yield
    console.print(f"[green]✓[/green] {description} ({time.perf_counter() - t0:.1f} s)")
