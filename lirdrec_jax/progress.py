"""Progress bars for the long steps (data conversion, kNN graph, an epoch's batches, evaluation,
a grid), with a rate and an ETA, in a terminal and in a notebook.

Bars are shown when someone watches: stderr is a terminal, or the code runs in a Jupyter kernel
(Colab). Written to a log file or a pipe, there are no bars and a run keeps its one progress
line per epoch. `LIRDREC_JAX_PROGRESS=1` or `=0` forces bars on or off. Bars that finish within
`delay` seconds are never drawn, so fast steps print nothing.

Lines printed while bars are on screen go through `write` (above the bars, not through them).
"""
import os
import sys
from typing import Optional

ENV = 'LIRDREC_JAX_PROGRESS'
DELAY_SECONDS = 1.0  # a bar is first drawn after this long (fast steps print nothing)


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (Jupyter, Colab)."""
    shell = sys.modules.get('IPython')
    if shell is None:
        return False
    ipython = shell.get_ipython() if hasattr(shell, 'get_ipython') else None
    return ipython is not None and 'IPKernelApp' in getattr(ipython, 'config', {})


def bars_enabled() -> bool:
    """Whether progress bars are drawn (see the module docstring)."""
    forced = os.environ.get(ENV, '').strip()
    if forced in ('0', '1'):
        return forced == '1'
    isatty = getattr(sys.stderr, 'isatty', None)
    return bool(isatty and isatty()) or in_notebook()


def _tqdm_class():
    """tqdm's notebook widget in a Jupyter kernel that has ipywidgets, else the text bar."""
    if in_notebook():
        try:
            import ipywidgets  # noqa: F401  (the widget bar needs it)
            from tqdm.notebook import tqdm
            return tqdm
        except ImportError:
            pass
    from tqdm import tqdm
    return tqdm


def bar(total: Optional[int], desc: str, *, unit: str = 'it', leave: bool = False,
        delay: Optional[float] = None, shown: bool = True):
    """A tqdm bar over `total` steps (disabled when bars are off: every call is then a no-op).

    Args:
      total: number of steps (None: a counter without ETA).
      desc: what is being done.
      unit: what one step is ('batch', 'epoch', 'point', ...).
      leave: keep the finished bar on screen (outer bars); inner bars disappear.
      delay: seconds before the bar is first drawn (default DELAY_SECONDS).
      shown: False: never drawn, whatever `bars_enabled` says.
    """
    delay = DELAY_SECONDS if delay is None else delay
    return _tqdm_class()(total=total, desc=desc, unit=unit, leave=leave, delay=delay,
                         disable=not (shown and bars_enabled()), dynamic_ncols=True,
                         file=sys.stderr)


def write(message: str) -> None:
    """Print one line on stdout without breaking bars on screen."""
    if bars_enabled():
        from tqdm import tqdm
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(message, flush=True)
