"""A small dependency-free progress printer (count, rate, ETA) for the long steps of the data
commands.

Writes to stderr (stdout stays for the summary table). On a terminal the line is redrawn in
place at most `min_interval` seconds apart (default 0.25 s, i.e. a few updates per second); on
a pipe or log file, where redrawing is impossible, a full line is written at most every
`log_interval` seconds (default 10 s) so logs stay short. `close()` always writes the final line.

    with Progress('reading ratings', total=n_bytes, unit='B') as bar:
        for chunk in chunks:
            bar.update(len(chunk))
"""
import sys
import time
from typing import Callable, Iterable, Iterator, Optional, TextIO, TypeVar

T = TypeVar('T')


def format_count(n: float, unit: str = '') -> str:
    """1234567 -> '1.23M'; bytes (unit 'B') use the same decimal prefixes: '12.3MB'."""
    for div, prefix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(n) >= div:
            return f'{n / div:.3g}{prefix}{unit}'
    return f'{n:.0f}{unit}' if float(n).is_integer() else f'{n:.3g}{unit}'


def format_seconds(seconds: float) -> str:
    """75 -> '1m15s', 9.4 -> '9s', 4000 -> '1h06m'."""
    s = int(round(seconds))
    if s >= 3600:
        return f'{s // 3600}h{s % 3600 // 60:02d}m'
    return f'{s // 60}m{s % 60:02d}s' if s >= 60 else f'{s}s'


class Progress:
    """Counts work done and prints a progress line, rate-limited.

    Args:
      desc: what is being done, e.g. 'reading ratings_Baby.csv'.
      total: the amount of work when known (then a percentage is shown), else None.
      unit: suffix of the counts ('' for rows, 'B' for bytes).
      stream: where to write; default sys.stderr (looked up at construction).
      enabled: False prints nothing at all (the commands' --quiet).
      min_interval: seconds between redraws on a terminal.
      log_interval: seconds between lines when `stream` is not a terminal.
      clock: the time source, injectable so that tests need not sleep.
    """

    def __init__(self, desc: str, total: Optional[float] = None, *, unit: str = '',
                 stream: Optional[TextIO] = None, enabled: bool = True,
                 min_interval: float = 0.25, log_interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.clock = clock
        isatty = getattr(self.stream, 'isatty', None)
        self.redraw = bool(isatty and isatty())
        self.interval = min_interval if self.redraw else log_interval
        self.count = 0.0
        self.start = clock()
        self.last_print = self.start
        self.printed_count = None   # the count shown by the last line written
        self.closed = False

    def _line(self) -> str:
        elapsed = self.clock() - self.start
        done = format_count(self.count, self.unit)
        rate = self.count / elapsed if elapsed > 0 else 0.0
        speed = f', {format_count(rate, self.unit)}/s' if rate > 0 else ''
        if self.total:
            pct = 100.0 * self.count / self.total
            eta = (f', ETA {format_seconds((self.total - self.count) / rate)}'
                   if rate > 0 and self.count < self.total else '')
            return (f'{self.desc}: {pct:5.1f}% {done}/{format_count(self.total, self.unit)} '
                    f'{elapsed:.1f}s{speed}{eta}')
        return f'{self.desc}: {done} {elapsed:.1f}s{speed}'

    def _write(self, final: bool) -> None:
        if not self.enabled:
            return
        self.printed_count = self.count
        line = self._line()
        if self.redraw:
            # \r returns to the line start; \x1b[K clears what a longer previous line left.
            self.stream.write('\r' + line + '\x1b[K' + ('\n' if final else ''))
        else:
            self.stream.write(line + '\n')
        self.stream.flush()

    def update(self, n: float = 1) -> None:
        """Adds `n` units of work; prints when the last print is `interval` seconds old."""
        self.count += n
        now = self.clock()
        if now - self.last_print >= self.interval:
            self.last_print = now
            self._write(final=False)

    def close(self) -> None:
        """Prints the final line (once, and not again when a line just showed the same count)."""
        if not self.closed:
            self.closed = True
            # A log line showing this very count was just written: do not repeat it. (On a
            # terminal the final write is still needed, to end the line.)
            if self.redraw or self.printed_count != self.count:
                self._write(final=True)

    def __enter__(self) -> 'Progress':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total: Optional[int] = None, *,
          enabled: bool = True, stream: Optional[TextIO] = None) -> Iterator[T]:
    """Yields from `items`, counting one unit per element."""
    if total is None and hasattr(items, '__len__'):
        total = len(items)
    with Progress(desc, total, enabled=enabled, stream=stream) as bar:
        for item in items:
            yield item
            bar.update(1)
