"""How a long command shows its progress, one way for all of them (data steps, generate, evaluate, training,
checkpoint averaging, distillation).

On a terminal (stderr is a TTY) a tqdm bar on stderr, with the rate and the time left; otherwise, in a log file or
a pipe where a redrawn bar would be a mess of carriage returns, a plain line on stderr at each tenth of the work
and at least every EVERY_SECONDS, with the same figures, as the engine's training log does:

    [shard] 3/10 file (30%), 1.52 file/s, eta 5s

stdout stays for results (`--validate-only --json`, `inspect`), so progress never goes there. TANDEM_PROGRESS=off
in the environment switches every display off (a scheduler's log that wants the results only); the training bar
also follows train.progress_bar.

    with progress.bar(len(batches), desc="generate", unit="ex") as bar:
        for batch in batches:
            ...
            bar.update(len(batch))
    for path in progress.iterate(files, desc="shard", unit="file"):
        ...
    progress.write("[pretrain] eval at step 100: ...")   # a log line that does not tear a bar (stdout)

`write` goes through tqdm.write, which wipes the bars on the terminal, prints the line and draws them again; a
plain print would land on the bar's line. It lives in the config leaf because every package may import it
(docs/architecture.md): data_pipeline, the training core and both recipes.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import IO, Any, Iterable, Iterator

EVERY_SECONDS = 30.0  # the longest silence of the plain-line display while work goes on
SWITCH = "TANDEM_PROGRESS"  # environment variable: "off" (or 0, false, no) shows no progress at all
_silenced = 0  # > 0 inside `silenced()`


def on_terminal(stream: IO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def switched_off() -> bool:
    return os.environ.get(SWITCH, "").strip().lower() in ("off", "0", "false", "no")


def bar(total: int | None = None, *, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
        file: IO | None = None):
    """A progress display for `total` units (None: unknown): a tqdm bar on a terminal, Lines otherwise, Silent when
    not enabled (e.g. on ranks other than 0), inside `silenced()` or when switched off (TANDEM_PROGRESS=off). All three take update(n), set_postfix(**figures), close() and work
    as context managers."""
    file = sys.stderr if file is None else file
    if not enabled or _silenced or switched_off():
        return Silent()
    if on_terminal(file):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=file, dynamic_ncols=True,
                    mininterval=0.5)
    return Lines(total, desc=desc, unit=unit, initial=initial, file=file)


def iterate(items: Iterable[Any], *, desc: str, unit: str = "it", total: int | None = None,
            enabled: bool = True) -> Iterator[Any]:
    """The items, one unit of progress each (total: len(items) when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with bar(total, desc=desc, unit=unit, enabled=enabled) as shown:
        for item in items:
            yield item
            shown.update(1)


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """No display for the work inside (e.g. generation metrics during training: the engine's evaluation line
    reports them, and every rank runs them)."""
    global _silenced
    _silenced += 1
    try:
        yield
    finally:
        _silenced -= 1


def write(text: str, file: IO | None = None) -> None:
    """Print a log line (stdout by default) without tearing a bar that is being drawn on the terminal."""
    from tqdm import tqdm

    file = sys.stdout if file is None else file
    tqdm.write(text, file=file)
    file.flush()


class Lines:
    """The display off a terminal: a line at each tenth of `total` and at least every `every_s` seconds, and one
    at close if the last line did not show the end."""

    def __init__(self, total: int | None, *, desc: str, unit: str, initial: int = 0, file: IO | None = None,
                 every_s: float = EVERY_SECONDS):
        self.total, self.desc, self.unit, self.every_s = total or None, desc, unit, every_s
        self.file = sys.stderr if file is None else file
        self.n = self._start_n = self._shown_n = initial
        self._start = self._shown_at = time.monotonic()
        self._tenth = self._tenths(initial)
        self.postfix = ""

    def _tenths(self, n: int) -> int:
        return n * 10 // self.total if self.total else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self._tenths(self.n) > self._tenth or now - self._shown_at >= self.every_s:
            self._show(now)

    def set_postfix(self, refresh: bool = False, **figures: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in figures.items())

    def close(self) -> None:
        if self.n != self._shown_n:
            self._show(time.monotonic())

    def _show(self, now: float) -> None:
        elapsed = now - self._start
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total} {self.unit} ({100 * self.n // self.total}%)" if self.total \
            else f"{self.n} {self.unit}"
        parts = [done, f"{rate:.3g} {self.unit}/s"]
        if self.total and self.n < self.total and rate > 0:
            parts.append(f"eta {(self.total - self.n) / rate:.0f}s")
        elif self.total and self.n >= self.total:
            parts.append(f"{elapsed:.0f}s")
        if self.postfix:
            parts.append(self.postfix)
        print(f"[{self.desc}] " + ", ".join(parts), file=self.file, flush=True)
        self._shown_n, self._shown_at, self._tenth = self.n, now, self._tenths(self.n)

    def __enter__(self) -> "Lines":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Silent:
    """No display (progress switched off, or a rank other than 0)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, refresh: bool = False, **figures: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Silent":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass
