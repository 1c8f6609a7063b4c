"""Amazon review dumps (2014 and 2018) -> MMRec layout.

Inputs (each plain or gzipped; gzip is recognised by content, not by name):
  --interactions  a ratings-only CSV (`ratings_Baby.csv` 2014: user,item,rating,timestamp;
                  `Baby.csv` 2018: item,user,rating,timestamp; no header) or a review file
                  in JSON lines (`reviews_Baby_5.json.gz`, `Baby_5.json.gz`: reviewerID,
                  asin, overall, unixReviewTime). A CSV with a header line is read by its
                  column names instead.
  --meta          `meta_Baby.json.gz`: one record per line; 2014 lines are Python dict
                  literals (read with ast.literal_eval, never eval), 2018 lines JSON.
  --image_features (optional) `image_features_Baby.b` (2014 only): records of a 10-byte ASIN
                  followed by 4096 float32, little-endian (see `read_image_features`).

Text of an item, as MMRec's feature notebook builds it: title, brand, the first category path
(2014 `categories[0]`; 2018 `category`), description (2018: its list joined), separated by
single spaces. Items without an image-feature row get the mean row, counted.

Usage:
  python -m data_prep.amazon --interactions reviews_Baby_5.json.gz --meta meta_Baby.json.gz \\
      --image_features image_features_Baby.b --out_dir /data/mine --name baby
  python -m lirdrec_jax.main --config lirdrec \\
      --config.data.data_dir=/data/mine --config.data.dataset=baby
"""
import argparse
import functools
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from data_prep import pipeline
from data_prep.interactions import InteractionLog, RawInteractions
from data_prep.progress import Progress
from data_prep.readers import (LineErrors, check_file, iter_lines, parse_rating,
                               parse_record, parse_timestamp)
from lirdrec_jax.data import DataError

IMAGE_DIM = 4096
ASIN_BYTES = 10
# Column order of the headerless ratings-only CSVs, by dump version.
CSV_COLUMNS = {'2014': ('user', 'item', 'rating', 'timestamp'),
               '2018': ('item', 'user', 'rating', 'timestamp')}
# Header names (lower-cased) accepted for each column of a CSV that has a header line.
HEADER_NAMES = {'user': ('user', 'user_id', 'userid', 'reviewerid'),
                'item': ('item', 'item_id', 'itemid', 'asin', 'parent_asin'),
                'rating': ('rating', 'overall'),
                'timestamp': ('timestamp', 'unixreviewtime', 'time')}
# Keys of a review record (JSON lines), in order of preference.
REVIEW_KEYS = {'user': ('reviewerID', 'user_id'), 'item': ('asin', 'parent_asin'),
               'rating': ('overall', 'rating'), 'timestamp': ('unixReviewTime', 'timestamp')}
_ASIN_FIELD = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]*)['"]""")
_SPACES = re.compile(r'\s+')


# --------------------------------------------------------------------------- interactions


def _header_columns(fields: Sequence[str]) -> Optional[Tuple[int, int, int, int]]:
    """Positions of user, item, rating, timestamp when `fields` is a header line, else None."""
    names = [f.strip().lower() for f in fields]
    found = []
    for column in ('user', 'item', 'rating', 'timestamp'):
        hits = [i for i, n in enumerate(names) if n in HEADER_NAMES[column]]
        if not hits:
            return None
        found.append(hits[0])
    return tuple(found)


def _looks_like_header(fields: Sequence[str]) -> bool:
    """True when no field of the first line parses as a number (a header, not a rating row)."""
    for f in fields:
        try:
            float(f)
            return False
        except ValueError:
            continue
    return True


def read_ratings_csv(path: Path, errors: LineErrors, *, columns: Sequence[str],
                     progress: bool = True) -> Tuple[RawInteractions, Dict[str, int]]:
    """Reads a ratings CSV (user/item/rating/timestamp in `columns` order, or by its header).

    Returns:
      (the interactions, counts: header lines read).
    """
    order = tuple(columns.index(c) for c in ('user', 'item', 'rating', 'timestamp'))
    width = len(columns)
    log = InteractionLog()
    counts = {}
    first = True
    for number, line in iter_lines(path, errors, progress=progress):
        fields = line.split(',')
        if first:
            first = False
            if _looks_like_header(fields):
                header = _header_columns(fields)
                if header is None:
                    raise DataError(f'{path}, line 1: header {fields}; expected column names '
                                    f'for user, item, rating and timestamp (e.g. '
                                    f'user_id,parent_asin,rating,timestamp), or no header')
                order, width = header, len(fields)
                counts['header_lines'] = 1
                continue
        if len(fields) != width:
            errors.report(path, number, f'{len(fields)} comma-separated fields; expected '
                                        f'{width} ({",".join(columns)})', line)
            continue
        u, i, r, t = (fields[j].strip() for j in order)
        try:
            rating, timestamp = parse_rating(r), parse_timestamp(t)
        except ValueError:
            errors.report(path, number, f'rating {r!r} / timestamp {t!r}; expected a number '
                                        f'and whole seconds', line)
            continue
        if not u or not i:
            errors.report(path, number, 'empty user or item id', line)
            continue
        log.add(u, i, rating, timestamp)
    raw = log.build()
    if 'header_lines' not in counts:
        check_column_order(raw, path, columns)
    return raw, counts


def _median_length(keys: Sequence[str]) -> float:
    """Median length of the first 2000 ids (enough to tell ASINs from reviewer ids)."""
    return float(np.median([len(k) for k in keys[:2000]])) if keys else 0.0


def check_column_order(raw: RawInteractions, path: Path, columns: Sequence[str]) -> None:
    """Catches a 2014/2018 mix-up: ASINs have 10 characters, reviewer ids usually more.

    Raises:
      DataError: the item column does not look like ASINs while the user column does.
    """
    item_len, user_len = _median_length(raw.item_keys), _median_length(raw.user_keys)
    if item_len != ASIN_BYTES and user_len == ASIN_BYTES:
        raise DataError(f'{path}: the item column holds ids of median length {item_len:g} and '
                        f'the user column ids of length 10 (like ASINs) with columns '
                        f'{",".join(columns)}; the 2014 ratings files are user,item,rating,'
                        f'timestamp and the 2018 ones item,user,rating,timestamp: check '
                        f'--version (or give --csv_columns)')


def _first(record: dict, keys: Sequence[str]):
    for key in keys:
        if key in record:
            return record[key]
    raise KeyError(keys[0])


def read_reviews_jsonl(path: Path, errors: LineErrors, *, progress: bool = True
                       ) -> Tuple[RawInteractions, Dict[str, int]]:
    """Reads a review file in JSON lines (or Python-literal lines)."""
    log = InteractionLog()
    for number, line in iter_lines(path, errors, progress=progress):
        try:
            record = parse_record(line)
        except ValueError as e:
            errors.report(path, number, f'not a review record ({e})', line)
            continue
        try:
            u, i = _first(record, REVIEW_KEYS['user']), _first(record, REVIEW_KEYS['item'])
            rating = parse_rating(_first(record, REVIEW_KEYS['rating']))
            timestamp = parse_timestamp(_first(record, REVIEW_KEYS['timestamp']))
        except KeyError as e:
            errors.report(path, number, f'no field {e.args[0]!r}; expected reviewerID, asin, '
                                        f'overall and unixReviewTime', line)
            continue
        except (TypeError, ValueError) as e:
            errors.report(path, number, f'bad rating or time ({e})', line)
            continue
        if not isinstance(u, str) or not isinstance(i, str) or not u or not i:
            errors.report(path, number, 'reviewer id or asin is not a non-empty string', line)
            continue
        log.add(u, i, rating, timestamp)
    return log.build(), {}


def read_interactions(path: Path, errors: LineErrors, *, version: str,
                      csv_columns: Optional[Sequence[str]] = None, progress: bool = True
                      ) -> Tuple[RawInteractions, Dict[str, int]]:
    """A ratings CSV or a JSON-lines review file, told apart by the first record's first
    character ('{' = JSON/literal record)."""
    first = next(iter_lines(path, LineErrors(skip=True), progress=False), (0, ''))[1]
    if first.lstrip().startswith('{'):
        return read_reviews_jsonl(path, errors, progress=progress)
    return read_ratings_csv(path, errors, columns=csv_columns or CSV_COLUMNS[version],
                            progress=progress)


# --------------------------------------------------------------------------- metadata


def _strings(value) -> List[str]:
    """A metadata field as a flat list of strings (str, list of str, or nested lists)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            out.extend(_strings(v))
        return out
    return [str(value)]


def item_text(record: dict) -> str:
    """title, brand, first category path, description, joined by single spaces.

    2014 records hold `categories` (a list of category paths; MMRec uses the first) and a
    string description; 2018 records hold `category` (one flat path) and a list description.
    """
    categories = record.get('categories')
    if isinstance(categories, list) and categories:
        path = _strings(categories[0])
    else:
        path = _strings(record.get('category'))
    parts = (_strings(record.get('title')) + _strings(record.get('brand')) + path
             + _strings(record.get('description')))
    return _SPACES.sub(' ', ' '.join(p for p in parts if p)).strip()


def read_metadata(path: Path, wanted: Set[str], errors: LineErrors, *, progress: bool = True
                  ) -> Tuple[Dict[str, str], Dict[str, int]]:
    """asin -> item text for the `wanted` asins.

    Only the lines of wanted items are parsed: a cheap pattern finds each line's asin first
    (metadata files list every product of a category, most of which have no interactions);
    a line where the pattern finds no asin is parsed in full, so a malformed line is still
    reported.

    Returns:
      (asin -> text, counts: duplicate records ignored).
    """
    texts: Dict[str, str] = {}
    duplicates = 0
    for number, line in iter_lines(path, errors, progress=progress):
        m = _ASIN_FIELD.search(line)
        if m is not None and m.group(1) not in wanted:
            continue
        try:
            record = parse_record(line)
        except ValueError as e:
            errors.report(path, number, f'not a metadata record ({e})', line)
            continue
        asin = record.get('asin')
        if not isinstance(asin, str) or not asin:
            errors.report(path, number, "no 'asin' field; expected one product record per "
                                        "line", line)
            continue
        if asin not in wanted:
            continue
        if asin in texts:
            duplicates += 1  # the first record wins
            continue
        texts[asin] = item_text(record)
    return texts, {'metadata_duplicate_records_ignored': duplicates}


# --------------------------------------------------------------------------- image features


def record_dtype(dim: int, byte_order: str) -> np.dtype:
    """One `.b` record: 10 ASIN bytes, then `dim` float32 in the given byte order."""
    return np.dtype([('asin', f'S{ASIN_BYTES}'),
                     ('feat', ('<f4' if byte_order == 'little' else '>f4', (dim,)))])


def _plausible(values: np.ndarray) -> bool:
    """CNN activations are finite, of moderate size, and either 0 or not vanishingly small.

    Read in the wrong byte order, ordinary values turn into huge numbers, NaN/Inf, or
    denormals (1.0 becomes 4.6e-41), so a record failing this test in one order and passing it
    in the other reveals the order.
    """
    magnitude = np.abs(values.astype(np.float64))
    nonzero = magnitude[magnitude > 0]
    return bool(np.isfinite(magnitude).all() and magnitude.max(initial=0.0) < 1e6
                and nonzero.min(initial=1.0) > 1e-30)


def _check_asins(asins: np.ndarray, first_record: int, path: Path, rec_size: int) -> None:
    """Raises DataError at the first record whose ASIN bytes are not printable ASCII."""
    codes = np.ascontiguousarray(asins).view(np.uint8).reshape(-1, ASIN_BYTES)
    ok = (((codes >= 0x21) & (codes <= 0x7e)) | (codes == 0) | (codes == 0x20)).all(axis=1)
    ok &= codes[:, 0] != 0
    if not ok.all():
        j = int(np.flatnonzero(~ok)[0])
        index = first_record + j
        raise DataError(f'{path}: record {index} (byte offset {index * rec_size}) starts with '
                        f'{bytes(codes[j])!r}, not a 10-character ASIN; expected records of '
                        f'a 10-byte ASIN followed by {(rec_size - ASIN_BYTES) // 4} float32 '
                        f'(check --image_dim)')


def read_image_features(path: Path, wanted: Sequence[str], *, dim: int = IMAGE_DIM,
                        byte_order: str = 'little', chunk_records: int = 256,
                        progress: bool = True
                        ) -> Tuple[np.ndarray, np.ndarray, Dict[str, int]]:
    """Reads the rows of the `wanted` ASINs from an Amazon `image_features_*.b` file.

    Format: records of a 10-byte ASIN (ASCII) then `dim` float32, repeated. The dataset page's
    reader uses Python's `array('f').fromfile`, i.e. the byte order of the machine, and the
    files were written and are read on x86 (little-endian); `byte_order='big'` reads a
    byte-swapped copy. The first record is checked: a wrong byte order gives non-finite or
    huge values, which is reported as an error naming the option.

    Args:
      path: the `.b` file.
      wanted: (n_items,) raw item ids, the final item order.
      dim: floats per record.
      byte_order: 'little' or 'big'.

    Returns:
      rows: (n_items, dim) float32, zero where absent.
      present: (n_items,) bool, True where a usable row was found.
      counts: records in the file, duplicate ASIN records ignored, rows with NaN/Inf and
        all-zero rows (both treated as absent, so they get the mean row).
    """
    dtype = record_dtype(dim, byte_order)
    rec_size = dtype.itemsize
    size = path.stat().st_size
    if size % rec_size:
        raise DataError(f'{path}: {size} bytes is not a whole number of {rec_size}-byte records '
                        f'(10-byte ASIN + {dim} float32); the last record, at byte '
                        f'{size - size % rec_size}, is truncated or --image_dim is wrong')
    index = {asin.encode('ascii', 'replace'): i for i, asin in enumerate(wanted)}
    rows = np.zeros((len(wanted), dim), dtype=np.float32)
    present = np.zeros(len(wanted), dtype=bool)
    counts = {'image_records_in_file': size // rec_size, 'image_duplicate_records_ignored': 0,
              'image_rows_nonfinite': 0, 'image_rows_all_zero': 0}
    seen = np.zeros(len(wanted), dtype=bool)
    with open(path, 'rb') as f, Progress(f'reading {path.name}', size, unit='B',
                                         enabled=progress) as bar:
        first_record = 0
        while True:
            block = f.read(rec_size * chunk_records)
            if not block:
                break
            recs = np.frombuffer(block, dtype=dtype)
            _check_asins(recs['asin'], first_record, path, rec_size)
            if first_record == 0:
                _check_byte_order(recs['feat'][0], path, byte_order)
            for j, asin in enumerate(recs['asin']):
                i = index.get(asin.rstrip(b'\x00 '))
                if i is None:
                    continue
                if seen[i]:
                    counts['image_duplicate_records_ignored'] += 1  # the first record wins
                    continue
                seen[i] = True
                row = recs['feat'][j].astype(np.float32)
                if not np.isfinite(row).all():
                    counts['image_rows_nonfinite'] += 1
                elif not row.any():
                    counts['image_rows_all_zero'] += 1
                else:
                    rows[i], present[i] = row, True
            first_record += recs.shape[0]
            bar.update(len(block))
    counts['image_rows_found'] = int(seen.sum())
    return rows, present, counts


def _check_byte_order(values: np.ndarray, path: Path, byte_order: str) -> None:
    if _plausible(values):
        return
    other = 'big' if byte_order == 'little' else 'little'
    # The same bytes read in the other byte order.
    if _plausible(values.view(values.dtype.newbyteorder())):
        raise DataError(f'{path}: the first record reads as non-finite or huge values in '
                        f'{byte_order}-endian order but as plausible ones in {other}-endian; '
                        f'pass --image_byte_order {other}')


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m data_prep.amazon',
        description='Amazon review dumps (2014/2018: ratings CSV or review JSON lines, '
                    'metadata, image features) -> MMRec layout (<out_dir>/<name>/<name>.inter, '
                    'text_feat.npy, image_feat.npy, id maps, manifest.json).')
    g = parser.add_argument_group('inputs')
    g.add_argument('--interactions', required=True,
                   help='ratings CSV (ratings_<Cat>.csv / <Cat>.csv) or review JSON lines '
                        '(reviews_<Cat>_5.json.gz / <Cat>_5.json.gz); plain or gzipped')
    g.add_argument('--meta', required=True, help='metadata, meta_<Cat>.json(.gz)')
    g.add_argument('--image_features', default=None,
                   help='image_features_<Cat>.b (2014); omit for no image_feat.npy')
    g.add_argument('--version', choices=('2014', '2018'), default='2014',
                   help='dump version: column order of a headerless ratings CSV (2014 '
                        'user,item,rating,timestamp; 2018 item,user,rating,timestamp)')
    g.add_argument('--csv_columns', default=None,
                   help='explicit column order of a headerless ratings CSV, e.g. '
                        'user,item,rating,timestamp')
    g.add_argument('--image_dim', type=int, default=IMAGE_DIM,
                   help='floats per image-feature record (4096)')
    g.add_argument('--image_byte_order', choices=('little', 'big'), default='little')
    pipeline.add_pipeline_args(parser, min_rating=None)
    return parser


def parse_csv_columns(text: Optional[str]) -> Optional[Tuple[str, ...]]:
    if text is None:
        return None
    columns = tuple(c.strip() for c in text.split(','))
    if sorted(columns) != sorted(('user', 'item', 'rating', 'timestamp')):
        raise DataError(f'--csv_columns {text!r}: expected the four names user, item, rating, '
                        f'timestamp in the file\'s order')
    return columns


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv, args, progress, encoder, errors = pipeline.start(build_parser(), argv)
    inter_path = check_file(args.interactions, 'an Amazon ratings CSV or review JSON-lines file')
    meta_path = check_file(args.meta, 'an Amazon metadata file (meta_<Category>.json.gz)')
    image_path = (check_file(args.image_features, 'an Amazon image_features_<Category>.b file')
                  if args.image_features else None)

    raw, read_fixes = read_interactions(inter_path, errors, version=args.version,
                                        csv_columns=parse_csv_columns(args.csv_columns),
                                        progress=progress)
    texts, meta_counts = read_metadata(meta_path, set(raw.item_keys), errors, progress=progress)
    read_fixes.update(meta_counts)
    # Image features are read after filtering, for the final items only.
    image_reader = None if image_path is None else functools.partial(
        read_image_features, image_path, dim=args.image_dim, byte_order=args.image_byte_order,
        progress=progress)
    inputs = [p for p in (inter_path, meta_path, image_path) if p is not None]
    pipeline.run('amazon', args, raw, item_texts=texts, image_reader=image_reader,
                 read_fixes=read_fixes, errors=errors, inputs=inputs,
                 raw_user_column='user_id', raw_item_column='asin', argv=argv, encoder=encoder)
    return 0


if __name__ == '__main__':
    sys.exit(pipeline.main_guard(main))
