"""Progress reporting for long work: a rich bar on a terminal, plain periodic lines otherwise.

Logs of batch jobs (Slurm, CI) are not terminals: there a bar would print nothing useful until the
end, so we print one line every few seconds instead.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# logs are not terminals: rich would lay tables out for 80 columns there and cut their headers
console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


class ProgressBar:
    """`with ProgressBar("shard", total=n, unit="img") as bar: bar.advance(k)`."""

    def __init__(
        self,
        description: str,
        total: int | None,
        unit: str = "it",
        enabled: bool = True,
        plain_every_s: float = 5.0,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.enabled = enabled
        self.plain_every_s = plain_every_s
        self.done = 0
        self._start = time.perf_counter()
        self._last_line = self._start
        self._rich: Progress | None = None
        self._task = None

    def __enter__(self) -> ProgressBar:
        self._start = self._last_line = time.perf_counter()
        if self.enabled and console.is_terminal:
            self._rich = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
            self._rich.__enter__()
            self._task = self._rich.add_task(self.description, total=self.total, rate="")
        return self

    @property
    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self._start, 1e-9)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        rate = f"{self.rate:,.0f} {self.unit}/s"
        if self._rich is not None:
            self._rich.update(self._task, advance=n, rate=rate)
        elif time.perf_counter() - self._last_line >= self.plain_every_s:
            self._last_line = time.perf_counter()
            self._plain_line(rate)

    def _plain_line(self, rate: str) -> None:
        total = f"/{self.total:,}" if self.total else ""
        print(f"{self.description}: {self.done:,}{total} {self.unit} ({rate})", file=sys.stderr)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._rich is not None:
            self._rich.__exit__(exc_type, exc, tb)
        elif self.enabled and exc_type is None:
            self._plain_line(f"{self.rate:,.0f} {self.unit}/s, done")
