"""A progress bar on stderr, drawn only on a terminal (a log or a pipe gets nothing)."""

from __future__ import annotations

import sys


class Progress:
    """tqdm when installed, else a one-line text bar; silent unless ``enabled`` and stderr is a tty."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(enabled and isatty is not None and isatty())
        self.total, self.done, self.bar = total, 0, None
        if self.enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="run", file=self.stream, leave=False)
            except ImportError:
                self.bar = None

    def describe(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(text)
        else:
            width = 24
            filled = int(width * self.done / max(1, self.total))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {text:<48}")
            self.stream.flush()

    def step(self) -> None:
        self.done += 1
        if self.enabled and self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            self.stream.write("\r" + " " * 90 + "\r")
            self.stream.flush()
