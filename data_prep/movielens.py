"""MovieLens (100K, 1M/10M, ml-latest/20M/25M/32M) -> MMRec layout.

The variant is recognised from the files in --input_dir (plain or gzipped):
  100k    u.data (user<TAB>item<TAB>rating<TAB>timestamp), u.item ('|'-separated: id, title,
          release date, video date, URL, 19 genre flags), u.genre (optional: genre names)
  1m      ratings.dat (user::movie::rating::timestamp), movies.dat (movie::title::genres)
          (also the 10M files, which share the format)
  latest  ratings.csv (userId,movieId,rating,timestamp), movies.csv (movieId,title,genres)

Ratings >= --min_rating (default 4) become implicit positives; then the shared filtering,
split and layout of `data_prep.pipeline`. Item text: title (a trailing ', The' / ', A' /
', An' moved to the front), year and genres, e.g. 'Toy Story (1995). Genres: Animation,
Children's, Comedy'. MovieLens has no images, so no image_feat.npy is written: see
docs/data_prep.md for the MLLM route (posters -> descriptions -> image_text_feat.npy).

Usage:
  python -m data_prep.movielens --input_dir ml-1m --out_dir /data/mine --name ml1m
"""
import argparse
import csv
import re
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from data_prep import pipeline
from data_prep.interactions import InteractionLog, RawInteractions
from data_prep.readers import LineErrors, iter_lines, parse_rating
from lirdrec_jax.data import DataError

# The 19 genre flags of u.item, in the order of ML-100K's u.genre.
ML100K_GENRES = ('unknown', 'Action', 'Adventure', 'Animation', "Children's", 'Comedy', 'Crime',
                 'Documentary', 'Drama', 'Fantasy', 'Film-Noir', 'Horror', 'Musical', 'Mystery',
                 'Romance', 'Sci-Fi', 'Thriller', 'War', 'Western')
NO_GENRES = '(no genres listed)'
# The 100K/1M files are Latin-1, the newer ones UTF-8; lines are tried in this order.
ENCODINGS = ('utf-8', 'latin-1')
VARIANT_FILES = {'100k': ('u.data', 'u.item'), '1m': ('ratings.dat', 'movies.dat'),
                 'latest': ('ratings.csv', 'movies.csv')}
_YEAR = re.compile(r'^(.*?)\s*\((\d{4})(?:[-–]\d{0,4})?\)\s*$')
_ARTICLE = re.compile(r'^(.*), (The|A|An)$')


def find_file(folder: Path, name: str) -> Optional[Path]:
    """`folder/name` or `folder/name.gz`, whichever exists."""
    for candidate in (folder / name, folder / f'{name}.gz'):
        if candidate.is_file():
            return candidate
    return None


def detect_variant(folder: Path) -> str:
    """'100k', '1m' or 'latest', from the files present.

    Raises:
      DataError: the folder holds none of the three layouts.
    """
    if not folder.is_dir():
        raise DataError(f'{folder} does not exist (or is not a folder); expected an unpacked '
                        f'MovieLens folder (ml-100k, ml-1m, ml-latest-small, ...)')
    for variant, (ratings, movies) in VARIANT_FILES.items():
        if find_file(folder, ratings) and find_file(folder, movies):
            return variant
    found = sorted(p.name for p in folder.iterdir())[:12]
    raise DataError(f'{folder}: found {found}; expected u.data + u.item (100K), ratings.dat + '
                    f'movies.dat (1M/10M) or ratings.csv + movies.csv (ml-latest, 20M, 25M, 32M)')


# --------------------------------------------------------------------------- ratings


def read_ratings(path: Path, variant: str, errors: LineErrors, *, progress: bool = True
                 ) -> Tuple[RawInteractions, Dict[str, int]]:
    """u.data / ratings.dat / ratings.csv -> interactions with int user and movie ids."""
    sep = {'100k': '\t', '1m': '::', 'latest': ','}[variant]
    log = InteractionLog()
    counts = {}
    for number, line in iter_lines(path, errors, encodings=ENCODINGS, progress=progress):
        fields = line.split(sep)
        if variant == 'latest' and number == 1 and fields[0].strip() == 'userId':
            counts['header_lines'] = 1
            continue
        if len(fields) != 4:
            errors.report(path, number, f'{len(fields)} fields separated by {sep!r}; expected 4 '
                                        f'(user, movie, rating, timestamp)', line)
            continue
        try:
            user, movie = int(fields[0]), int(fields[1])
            rating, timestamp = parse_rating(fields[2]), int(fields[3])
        except ValueError:
            errors.report(path, number, 'expected integer user and movie ids, a numeric '
                                        'rating and an integer timestamp', line)
            continue
        log.add(user, movie, rating, timestamp)
    return log.build(), counts


# --------------------------------------------------------------------------- movies


def split_title(title: str) -> Tuple[str, Optional[str]]:
    """'American President, The (1995)' -> ('The American President', '1995').

    The year is a trailing '(YYYY)'; a trailing English article is moved to the front (as the
    title reads). Titles without a year keep their text and give None.
    """
    title = title.strip()
    m = _YEAR.match(title)
    year = None
    if m:
        title, year = m.group(1).strip(), m.group(2)
    a = _ARTICLE.match(title)
    if a:
        title = f'{a.group(2)} {a.group(1)}'
    return title, year


def movie_text(title: str, genres: Sequence[str], year: Optional[str] = None) -> str:
    """'Toy Story (1995). Genres: Animation, Children's, Comedy' from its parts."""
    name, title_year = split_title(title)
    year = title_year or year
    text = f'{name} ({year})' if year else name
    genres = [g for g in genres if g and g != NO_GENRES]
    if genres:
        text += '. Genres: ' + ', '.join(genres)
    return text


def read_genre_names(path: Optional[Path], errors: LineErrors) -> Tuple[str, ...]:
    """Genre names of u.genre ('name|index' lines), or the standard 19 when absent."""
    if path is None:
        return ML100K_GENRES
    names = {}
    for number, line in iter_lines(path, errors, encodings=ENCODINGS, progress=False):
        name, _, index = line.rpartition('|')
        if not name or not index.strip().isdigit():
            errors.report(path, number, "expected 'genre name|index'", line)
            continue
        names[int(index)] = name
    if sorted(names) != list(range(len(names))):
        raise DataError(f'{path}: genre indices {sorted(names)}; expected 0..n-1')
    return tuple(names[i] for i in range(len(names)))


def _add_movie(texts: Dict[int, str], movie: int, text: str, counts: Dict[str, int]) -> None:
    if movie in texts:
        counts['movie_duplicate_records_ignored'] += 1  # the first record wins
    else:
        texts[movie] = text


def read_movies(path: Path, variant: str, errors: LineErrors, *,
                genre_names: Sequence[str] = ML100K_GENRES, progress: bool = True
                ) -> Tuple[Dict[int, str], Dict[str, int]]:
    """u.item / movies.dat / movies.csv -> movie id -> text."""
    texts: Dict[int, str] = {}
    counts = {'movie_duplicate_records_ignored': 0}
    n_flags = len(genre_names)
    for number, line in iter_lines(path, errors, encodings=ENCODINGS, progress=progress):
        if variant == '100k':
            fields = line.split('|')
            expected = 5 + n_flags
            if len(fields) != expected:
                errors.report(path, number, f'{len(fields)} fields separated by |; expected '
                                            f'{expected} (id, title, release date, video date, '
                                            f'URL, {n_flags} genre flags)', line)
                continue
            flags = fields[5:]
            if any(f not in ('0', '1') for f in flags):
                errors.report(path, number, 'genre flags must be 0 or 1', line)
                continue
            genres = [g for g, f in zip(genre_names, flags) if f == '1']
            date_year = fields[2][-4:] if re.fullmatch(r'\d\d-\w{3}-\d{4}', fields[2]) else None
            movie_id, text = fields[0], movie_text(fields[1], genres, date_year)
        else:
            if variant == '1m':
                fields = line.split('::')
            else:
                fields = next(csv.reader([line]))
                if number == 1 and fields and fields[0].strip() == 'movieId':
                    continue
            if len(fields) != 3:
                errors.report(path, number, f'{len(fields)} fields; expected 3 (movie id, '
                                            f'title, genres)', line)
                continue
            movie_id, text = fields[0], movie_text(fields[1], fields[2].split('|'))
        try:
            movie = int(movie_id)
        except ValueError:
            errors.report(path, number, f'movie id {movie_id!r}; expected an integer', line)
            continue
        _add_movie(texts, movie, text, counts)
    return texts, counts


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m data_prep.movielens',
        description='MovieLens 100K / 1M / 10M / ml-latest / 20M / 25M / 32M -> MMRec layout '
                    '(<out_dir>/<name>/<name>.inter, text_feat.npy from title, year and '
                    'genres, id maps, manifest.json).')
    parser.add_argument('--input_dir', required=True,
                        help='the unpacked MovieLens folder (e.g. ml-100k/, ml-1m/)')
    parser.add_argument('--variant', choices=('auto', '100k', '1m', 'latest'), default='auto',
                        help='file layout; auto = recognised from the files present')
    pipeline.add_pipeline_args(parser, min_rating=4.0)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv, args, progress, encoder, errors = pipeline.start(build_parser(), argv)
    folder = Path(args.input_dir)
    variant = detect_variant(folder) if args.variant == 'auto' else args.variant
    ratings_name, movies_name = VARIANT_FILES[variant]
    ratings_path, movies_path = find_file(folder, ratings_name), find_file(folder, movies_name)
    if ratings_path is None or movies_path is None:
        raise DataError(f'{folder}: --variant {variant} expects {ratings_name} and '
                        f'{movies_name} (optionally .gz); found '
                        f'{sorted(p.name for p in folder.iterdir())[:12]}')
    args.variant_used = variant  # recorded in the manifest's options next to --variant
    raw, read_fixes = read_ratings(ratings_path, variant, errors, progress=progress)
    genre_path = find_file(folder, 'u.genre') if variant == '100k' else None
    texts, movie_counts = read_movies(movies_path, variant, errors,
                                      genre_names=read_genre_names(genre_path, errors),
                                      progress=progress)
    read_fixes.update(movie_counts)
    inputs = [p for p in (ratings_path, movies_path, genre_path) if p is not None]
    pipeline.run('movielens', args, raw, item_texts=texts, image_reader=None,
                 read_fixes=read_fixes, errors=errors, inputs=inputs,
                 raw_user_column='userId', raw_item_column='movieId', argv=argv, encoder=encoder)
    return 0


if __name__ == '__main__':
    sys.exit(pipeline.main_guard(main))
