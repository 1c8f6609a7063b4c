"""Reading raw dataset files line by line: plain or gzipped, with line numbers and a policy for
malformed lines.

Every raw format the data commands read (Amazon CSV / JSON lines / Python-literal lines,
MovieLens `u.data` / `.dat` / `.csv`) goes through `iter_lines`, so that

  * gzip is recognised by the file's magic bytes (not its name), and both forms read the same;
  * lines are decoded one at a time, so a bad byte sequence is reported with its line number;
  * a malformed line is either an error naming the file, the line and what was expected
    (default), or, with `skip=True`, skipped and counted, its line number kept for the report.
"""
import ast
import gzip
import json
import math
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from data_prep.progress import Progress
from lirdrec_jax.data import DataError

PathLike = Union[str, os.PathLike]

GZIP_MAGIC = b'\x1f\x8b'
# Line numbers of skipped lines kept for the report (the count is always complete).
MAX_REPORTED_LINES = 10


def is_gzip(path: PathLike) -> bool:
    """True when the file starts with the gzip magic bytes."""
    with open(path, 'rb') as f:
        return f.read(2) == GZIP_MAGIC


def check_file(path: PathLike, what: str) -> Path:
    """Raises DataError unless `path` is an existing file; `what` says what it should hold."""
    path = Path(path)
    if not path.is_file():
        hint = ''
        if path.parent.is_dir():
            found = sorted(p.name for p in path.parent.iterdir())[:12]
            hint = f'; files in {path.parent}: {found}'
        raise DataError(f'{path} does not exist (or is not a file); expected {what}{hint}')
    return path


class LineErrors:
    """The malformed-line policy of one command run, and its tally.

    Args:
      skip: False = the first malformed line is a DataError; True = skip and count.
    """

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.counts: Dict[str, int] = {}
        self.examples: Dict[str, List[str]] = {}

    def report(self, path: PathLike, line_number: int, problem: str, line: str) -> None:
        """Handles one malformed line: raises, or counts it under the file's name."""
        shown = line if len(line) <= 120 else line[:117] + '...'
        if not self.skip:
            raise DataError(f'{path}, line {line_number}: {problem}; the line reads {shown!r} '
                            f'(pass --skip_malformed to skip and count such lines instead)')
        key = Path(path).name
        self.counts[key] = self.counts.get(key, 0) + 1
        examples = self.examples.setdefault(key, [])
        if len(examples) < MAX_REPORTED_LINES:
            examples.append(f'line {line_number}: {problem}')

    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> Dict[str, object]:
        """{file name: {'skipped': n, 'first': [...]}} for the manifest."""
        return {k: {'skipped': n, 'first': self.examples[k]} for k, n in self.counts.items()}


def iter_lines(path: PathLike, errors: LineErrors, *, encodings: Sequence[str] = ('utf-8',),
               desc: Optional[str] = None, progress: bool = True) -> Iterator[Tuple[int, str]]:
    """Yields (1-based line number, text without the line terminator) of a plain or gzip file.

    Blank lines are skipped (they carry no record). Each line is decoded with the first of
    `encodings` that accepts it (MovieLens 100K/1M are Latin-1, the newer files UTF-8); a line
    no encoding accepts is a malformed line.

    Args:
      path: the file.
      errors: the malformed-line policy.
      encodings: tried in order, per line.
      desc: progress label (default: 'reading <file name>').
      progress: False silences the progress line.
    """
    path = Path(path)
    size = os.path.getsize(path)
    gz = is_gzip(path)
    with open(path, 'rb') as raw, Progress(desc or f'reading {path.name}', size, unit='B',
                                           enabled=progress) as bar:
        stream = gzip.GzipFile(fileobj=raw) if gz else raw
        last = 0
        try:
            for number, data in enumerate(stream, 1):
                if number % 4096 == 0:
                    # Progress in bytes of the file on disk (compressed bytes for gzip).
                    pos = raw.tell()
                    bar.update(pos - last)
                    last = pos
                text = _decode(data, encodings)
                if text is None:
                    errors.report(path, number, f'not decodable as {" or ".join(encodings)}',
                                  data.decode('utf-8', 'replace').rstrip('\r\n'))
                    continue
                text = text.rstrip('\r\n')
                if text.strip():
                    yield number, text
        except (EOFError, gzip.BadGzipFile, OSError) as e:
            if not gz:
                raise
            raise DataError(f'{path}: the gzip stream is truncated or corrupt ({e}); expected a '
                            f'complete .gz file (download it again)') from e
        bar.update(size - last)


def _decode(data: bytes, encodings: Sequence[str]) -> Optional[str]:
    for enc in encodings:
        try:
            return data.decode(enc)
        except UnicodeDecodeError:
            continue
    return None


def parse_record(text: str) -> dict:
    """One record of a JSON-lines or Python-literal-lines file, as a dict.

    Amazon's 2014 metadata (`meta_*.json.gz`) holds Python dict literals (single quotes), not
    JSON; the 2018 files and the review files hold JSON. Lines that start like a Python
    literal go straight to `ast.literal_eval` (safe: it evaluates literals only, never code);
    others are tried as JSON first.

    Raises:
      ValueError: the line is neither, or is not a dict/object.
    """
    stripped = text.lstrip()
    literal_first = stripped.startswith("{'")
    record = None
    if not literal_first:
        try:
            record = json.loads(stripped)
        except ValueError:
            record = None
    if record is None:
        try:
            record = ast.literal_eval(stripped)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise ValueError(f'neither JSON nor a Python literal ({type(e).__name__})') from None
    if not isinstance(record, dict):
        raise ValueError(f'a {type(record).__name__}, not an object/dict')
    return record


def parse_rating(value) -> float:
    """A finite rating from '5.0', '4', 4.5; ValueError for anything else (NaN included)."""
    if isinstance(value, bool):
        raise ValueError('a boolean is not a rating')
    rating = float(value)
    if not math.isfinite(rating):
        raise ValueError(f'{value!r} is not a finite number')
    return rating


def parse_timestamp(value) -> int:
    """Whole seconds from '1388275200', '1388275200.0' or an int; ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError('a boolean is not a time')
    if isinstance(value, int):
        return value
    seconds = float(value)
    if not math.isfinite(seconds) or seconds != int(seconds):
        raise ValueError(f'{value!r} is not a whole number of seconds')
    return int(seconds)
