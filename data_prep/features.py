"""MLLM features, the paper's variant: item images -> descriptions -> text embeddings.

LIRDRec's paper converts each item image into a text with a multimodal LLM and embeds that
text with a language model, then uses the embedding as the item's image modality. This stage
does the same for a dataset folder in MMRec layout (ours or MMRec's own downloads):

  descriptions  where the text of item i comes from (the captioner), one of
                --descriptions FILE.jsonl   (default) lines {"item_id" or "asin": raw id,
                                            "text": description}, produced elsewhere, e.g. by
                                            any multimodal LLM on your own hardware;
                --captioner_cmd "CMD {image}"  runs CMD once per image; stdout is the text;
                --captioner module:function    calls function(image_path) -> text;
                the last two need --image_dir (files named by raw item id, --image_pattern)
                and append what they produce to a JSON-lines file (default
                <dataset_dir>/<output stem>.descriptions.jsonl) that a rerun reuses, so an
                interrupted captioning run continues where it stopped;
  encoder       the same choice as the data commands (--encoder sbert/hashing,
                --encoder_model DIR for another sentence-transformers model);
  output        <dataset_dir>/image_text_feat.npy (n_items, d) float32, row i = item i;
                items without a description get the mean row (counted), plus
                image_text_feat.manifest.json (options, counts, sha256).

Raw item ids come from the folder's i_id_mapping.csv (raw id column, itemID column), which the
`amazon` / `movielens` commands write and MMRec's datasets ship.

MLLMRec reads a file of the same default name built differently (each description joined with
the item's text, plus a user file): `python -m data_prep.mllmrec` reuses this stage for it.

Train with it as the image modality:
  python -m lirdrec_jax.main --config lirdrec --config.data.data_dir=DATA \\
      --config.data.dataset=NAME --config.data.image_file=image_text_feat.npy
"""
import argparse
import glob
import importlib
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from data_prep import encoders, writer
from data_prep.pipeline import main_guard
from data_prep.progress import Progress
from data_prep.readers import LineErrors, check_file, iter_lines, parse_record
from lirdrec_jax import mmrec_files
from lirdrec_jax.data import DataError
# np.save via a temp file and os.replace (never a truncated .npy); shared with lirdrec_jax.
from lirdrec_jax.model_inputs import save_npy_atomic

ITEM_MAP = 'i_id_mapping.csv'
DEFAULT_OUTPUT = 'image_text_feat.npy'
ID_KEYS = ('item_id', 'asin')
MAX_REPORTED = 10

Captioner = Callable[[str], str]


# --------------------------------------------------------------------------- inputs


def read_id_map(path: Path, n: int, id_column: str = 'itemID') -> List[str]:
    """Raw id of each mapped id 0..n-1, from a tab-separated map with a header.

    The header names the columns: `id_column` ('itemID' or 'userID') and one other column
    holding the raw id (MMRec's item maps call it `asin`; ours `asin` or `movieId`).

    Raises:
      DataError: missing columns, malformed lines, or mapped ids that are not exactly 0..n-1.
    """
    kind = id_column[:-2]  # 'item' / 'user'
    lines = check_file(path, f'the {kind} id map ({kind[0]}_id_mapping.csv: raw id<TAB>'
                             f'{id_column} per line)').read_text(encoding='utf-8').splitlines()
    header = lines[0].split('\t') if lines else []
    if len(header) != 2 or id_column not in header:
        raise DataError(f'{path}, line 1: header {header}; expected two tab-separated columns, '
                        f'one named {id_column} and one the raw {kind} id'
                        + (' (e.g. asin)' if kind == 'item' else ''))
    new_col = header.index(id_column)
    keys: Dict[int, str] = {}
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split('\t')
        if len(fields) != 2 or not fields[new_col].strip().isdigit():
            raise DataError(f'{path}, line {number}: {line!r}; expected raw id<TAB>{id_column} '
                            f'with an integer {id_column}')
        mapped = int(fields[new_col])
        if mapped in keys:
            raise DataError(f'{path}, line {number}: {id_column} {mapped} appears a second time; '
                            f'expected each {id_column} once')
        keys[mapped] = fields[1 - new_col].strip()
    if sorted(keys) != list(range(n)):
        missing = sorted(set(range(n)) - set(keys))[:5]
        raise DataError(f'{path}: {len(keys)} {id_column}s (range {min(keys, default=None)}..'
                        f'{max(keys, default=None)}), but the .inter file has n_{kind}s={n}; '
                        f'expected exactly the {id_column}s 0..{n - 1} (first missing: '
                        f'{missing})')
    return [keys[i] for i in range(n)]


def read_item_map(path: Path, n_items: int) -> List[str]:
    """Raw item id of each itemID 0..n_items-1 (`read_id_map` of an i_id_mapping.csv)."""
    return read_id_map(path, n_items, 'itemID')


def read_descriptions(path: Path, errors: LineErrors, *, progress: bool = True
                      ) -> Tuple[Dict[str, str], Dict[str, int]]:
    """raw item id -> description, from JSON lines {"item_id" or "asin": id, "text": str}.

    Ids are compared as strings (MovieLens ids may be written as numbers). The first
    description of an item wins; later ones are counted.
    """
    read = read_keyed_texts(path, errors, _description_key, progress)
    return read.texts, {'duplicate_descriptions_ignored': read.duplicates}


def _description_key(record: dict) -> tuple:
    """`read_keyed_texts`'s (key, stranger, problem) of one description line: its raw id as a
    string; a missing id and a text that is not a string are one malformed-line message."""
    key = next((record[k] for k in ID_KEYS if k in record), None)
    if key is None or isinstance(key, (dict, list)) or not isinstance(record.get('text'), str):
        return None, None, 'expected {"item_id" (or "asin"): id, "text": string}'
    return str(key), None, ''


class KeyedTexts(NamedTuple):
    """What `read_keyed_texts` read.

    Attributes:
      texts: key -> text, the first text of each key.
      duplicates: later texts of a key, ignored.
      unknown: lines whose id is no key of the dataset, skipped.
      first_unknown: the first three of those ids, as written.
    """
    texts: dict
    duplicates: int
    unknown: int
    first_unknown: List[str]


def read_keyed_texts(path: Path, errors: LineErrors, key_of: Callable[[dict], tuple],
                     progress: bool = True) -> KeyedTexts:
    """Texts keyed by the dataset's ids from JSON lines {<id field>: id, "text": string}.

    `key_of(record)` -> (key, stranger, problem): a non-empty `problem` makes the line malformed
    (reported through `errors` with that text); so does a "text" that is not a string;
    otherwise a None key is an id that is no key of the dataset (`stranger`, the id as
    written), counted. The first text of a key wins; later ones are counted.
    """
    texts: dict = {}
    duplicates, unknown, first_unknown = 0, 0, []
    for number, line in iter_lines(path, errors, progress=progress):
        try:
            record = parse_record(line)
        except ValueError as e:
            errors.report(path, number, f'not a JSON object ({e})', line)
            continue
        key, stranger, problem = key_of(record)
        if problem:
            errors.report(path, number, problem, line)
            continue
        text = record.get('text')
        if not isinstance(text, str):
            errors.report(path, number, f'field text is {text!r}; expected a string', line)
            continue
        if key is None:
            unknown += 1
            first_unknown = (first_unknown + [stranger])[:3]
            continue
        if key in texts:
            duplicates += 1
            continue
        texts[key] = text
    return KeyedTexts(texts, duplicates, unknown, first_unknown)


# --------------------------------------------------------------------------- captioners


class CommandCaptioner:
    """Runs a command per image; its standard output is the description.

    Args:
      template: the command line; `{image}` is replaced by the image path and `{item_id}` by
        the raw item id, inside each argument after shell-like splitting (no shell runs, so
        paths with spaces or quotes are passed intact).
      timeout: seconds per image.
    """

    def __init__(self, template: str, timeout: float = 600.0):
        self.argv = shlex.split(template)
        if not any('{image}' in a for a in self.argv):
            raise DataError(f'--captioner_cmd {template!r}: expected {{image}} where the image '
                            f'path goes, e.g. "my-captioner --image {{image}}"')
        self.timeout = timeout

    def __call__(self, image: str, item_id: str = '') -> str:
        argv = [a.replace('{image}', image).replace('{item_id}', item_id) for a in self.argv]
        return run_command(argv, self.timeout)


def run_command(argv: Sequence[str], timeout: float, stdin: Optional[str] = None) -> str:
    """Runs `argv` (no shell), `stdin` as its standard input, and returns its standard output,
    stripped. A command not found, no answer within `timeout` seconds or a non-zero exit
    status (with the end of its stderr) is a RuntimeError saying which."""
    try:
        out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise RuntimeError(f'command {argv[0]!r} not found ({e})') from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f'no answer within {timeout:g} s') from None
    if out.returncode != 0:
        raise RuntimeError(f'exit status {out.returncode}; stderr: '
                           f'{out.stderr.strip()[-300:]!r}')
    return out.stdout.strip()


def load_callable(spec: str, option: str = '--captioner') -> Callable:
    """`package.module:function` -> the function (for `--captioner`, called as
    function(image_path) -> text); `option` names the command-line option in messages."""
    module_name, _, attr = spec.partition(':')
    if not module_name or not attr:
        raise DataError(f'{option} {spec!r}: expected module:function, e.g. '
                        f'my_module:describe')
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DataError(f'{option} {spec!r}: cannot import {module_name!r} ({e}); expected '
                        f'a module on the Python path') from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DataError(f'{option} {spec!r}: {module_name} has no callable {attr!r}')
    return fn


def find_image(image_dir: Path, pattern: str, key: str) -> Optional[Path]:
    """The image of one item: `pattern` with {item_id} replaced, globbed in `image_dir`.

    The default pattern '{item_id}.*' matches any extension; the first match in sorted order
    is used.
    """
    matches = sorted(glob.glob(str(image_dir / pattern.replace('{item_id}', glob.escape(key)))))
    return Path(matches[0]) if matches else None


def caption_items(keys: Sequence[str], captioner: Callable, image_dir: Path, pattern: str, *,
                  known: Dict[str, str], save_to: Path, on_error: str, pass_item_id: bool,
                  progress: bool = True) -> Tuple[Dict[str, str], Dict[str, object]]:
    """Describes every item not in `known`, appending each new description to `save_to`.

    Args:
      keys: raw item ids in itemID order.
      captioner: image path (and, when `pass_item_id`, the raw id) -> text.
      image_dir, pattern: where the images are (see `find_image`).
      known: descriptions already saved by an earlier run; reused, not recomputed.
      save_to: JSON-lines file the new descriptions are appended to (flushed per item).
      on_error: 'stop' = a failing image is a DataError; 'skip' = counted, no description.

    Returns:
      (raw id -> description for the items described, counts).
    """
    texts = {k: known[k] for k in keys if k in known}
    counts: Dict[str, object] = {'descriptions_reused': len(texts), 'descriptions_produced': 0,
                                 'items_without_image': 0, 'captioner_failures': 0}
    failures: List[str] = []
    todo = [k for k in keys if k not in texts]
    images: Dict[str, Path] = {}

    def describe(key):
        image = find_image(image_dir, pattern, key)
        if image is None:
            counts['items_without_image'] += 1
            return None
        images[key] = image
        return captioner(str(image), key) if pass_item_id else captioner(str(image))

    produced = produce_texts(
        todo, describe, save_to=save_to, line=lambda key, text: {'item_id': key, 'text': text},
        on_error=on_error, label=lambda key: f'item {key!r}, image {images.get(key)}',
        what='captioner', skip_hint='pass --on_caption_error skip to count such items and give '
                                    'them the mean row',
        desc='captioning images', progress=progress)
    texts.update(produced.texts)
    counts['descriptions_produced'] = len(produced.texts)
    counts['captioner_failures'] = len(produced.failures)
    if produced.failures:
        counts['captioner_failures_first'] = produced.failures[:MAX_REPORTED]
    return texts, counts


class Produced(NamedTuple):
    """What `produce_texts` made: key -> text, and one message per failed key."""
    texts: Dict[str, str]
    failures: List[str]


def produce_texts(todo: Sequence[str], make: Callable[[str], Optional[str]], *, save_to: Path,
                  line: Callable[[str, str], dict], on_error: str, label: Callable[[str], str],
                  what: str, skip_hint: str, desc: str, progress: bool = True) -> Produced:
    """Calls a text generator once per key, appending each text to a JSON-lines file at once.

    The resumable core of every stage that runs a model per record (a captioner per image, a
    profile writer per user): each new text is written and flushed before the next call, so
    an interrupted run loses at most the record in progress and a rerun that reads `save_to`
    first skips what is done.

    Args:
      todo: the keys still to do, in order.
      make: key -> text; None = nothing to make for this key (not a failure, not saved);
        raises (or returns a blank or non-string) on failure.
      save_to: the JSON-lines file appended to.
      line: (key, text) -> the JSON object written for it.
      on_error: 'stop' = the first failure is a DataError; 'skip' = reported in `failures`.
      label: key -> how messages name it (e.g. "item 'B01', image /x/B01.jpg").
      what: what fails, in messages ('captioner').
      skip_hint: appended to a 'stop' error (how to skip instead).
      desc: progress label.
      progress: False = no progress line.

    Returns:
      The texts made (stripped) and the failure messages.
    """
    texts: Dict[str, str] = {}
    failures: List[str] = []
    with open(save_to, 'a', encoding='utf-8') as out, \
            Progress(desc, len(todo), enabled=progress) as bar:
        for key in todo:
            bar.update(1)
            try:
                text = make(key)
                if text is None:
                    continue
                if not isinstance(text, str) or not text.strip():
                    raise RuntimeError(f'returned {text!r}; expected a non-empty string')
            except Exception as e:  # the generator is user code: any failure is reported
                message = f'{label(key)}: {e}'
                if on_error == 'stop':
                    raise DataError(f'{what} failed on {message} ({skip_hint})') from e
                failures.append(message)
                continue
            texts[key] = text.strip()
            out.write(json.dumps(line(key, texts[key]), ensure_ascii=False) + '\n')
            out.flush()
    return Produced(texts, failures)


# --------------------------------------------------------------------------- features


def build_features(keys: Sequence[str], descriptions: Dict[str, str],
                   encoder: encoders.Encoder, out_path: Path
                   ) -> Tuple[np.ndarray, Dict[str, int]]:
    """Encodes the description of each item (itemID order); mean row for the others.

    Returns:
      ((n_items, d) float32, validated as training validates features, counts).
    """
    texts = [descriptions.get(k) for k in keys]
    try:
        feat, n_filled = encoders.encode_item_texts(encoder, texts)
    except ValueError as e:
        raise DataError(f'{out_path}: {e}; expected descriptions keyed by the raw item ids of '
                        f'{ITEM_MAP} (first ids: {list(keys[:3])})') from None
    feat = mmrec_files.validate_features(feat, out_path, len(keys))
    counts = {'items': len(keys), 'items_described': len(keys) - n_filled,
              'items_without_description_mean_filled': n_filled,
              'descriptions_for_unknown_items': len(set(descriptions) - set(keys))}
    return feat, counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m data_prep.features',
        description='MLLM features: item images -> descriptions (a captioner) -> embeddings '
                    '(a text encoder) -> <dataset_dir>/image_text_feat.npy, usable as the '
                    'image modality (--config.data.image_file=image_text_feat.npy).')
    parser.add_argument('--dataset_dir', required=True,
                        help='the dataset folder <data_dir>/<name> (holds <name>.inter and '
                             f'{ITEM_MAP})')
    parser.add_argument('--name', default=None,
                        help='dataset name (the .inter stem); default the folder name')
    parser.add_argument('--item_map', default=None, help=f'default <dataset_dir>/{ITEM_MAP}')
    add_captioner_args(parser)
    parser.add_argument('--output', default=DEFAULT_OUTPUT,
                        help=f'feature file written inside the dataset folder ({DEFAULT_OUTPUT})')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output')
    parser.add_argument('--skip_malformed', action='store_true',
                        help='skip and count malformed lines of --descriptions')
    parser.add_argument('--quiet', action='store_true', help='no progress lines on stderr')
    encoders.add_encoder_args(parser)
    return parser


def add_captioner_args(parser: argparse.ArgumentParser) -> None:
    """The captioner options (--descriptions, --captioner_cmd, --captioner and theirs)."""
    g = parser.add_argument_group('captioner (one of)')
    g.add_argument('--descriptions', default=None,
                   help='JSON lines {"item_id" or "asin": raw id, "text": description} '
                        '(the default captioner: descriptions produced elsewhere)')
    g.add_argument('--captioner_cmd', default=None,
                   help='command run per image, e.g. "my-mllm --image {image}"; stdout = text')
    g.add_argument('--captioner', default=None,
                   help='Python callable module:function(image_path) -> text')
    g.add_argument('--image_dir', default=None,
                   help='folder of item images (for --captioner_cmd / --captioner)')
    g.add_argument('--image_pattern', default='{item_id}.*',
                   help='image file name of an item inside --image_dir (default {item_id}.*)')
    g.add_argument('--save_descriptions', default=None,
                   help='JSON-lines file the produced descriptions are appended to and reused '
                        'from (default <dataset_dir>/<output stem>.descriptions.jsonl)')
    g.add_argument('--on_caption_error', choices=('stop', 'skip'), default='stop',
                   help='stop at a failing image (default) or count it and use the mean row')
    g.add_argument('--caption_timeout', type=float, default=600.0,
                   help='seconds per image for --captioner_cmd')


CAPTIONER_OPTIONS = ('descriptions', 'captioner_cmd', 'captioner')


def captioner_source(args) -> str:
    """Which of the captioner options was given (exactly one must be)."""
    given = [n for n in CAPTIONER_OPTIONS if getattr(args, n)]
    if len(given) != 1:
        raise DataError(f'give exactly one of --descriptions, --captioner_cmd, --captioner '
                        f'(got {["--" + n for n in given] or "none"})')
    if given[0] != 'descriptions' and not args.image_dir:
        raise DataError(f'--{given[0]} needs --image_dir, the folder of item images')
    return given[0]


def make_captioner(args, source: str) -> Optional[Callable]:
    """The captioner of `source` (None for --descriptions, which are read, not produced)."""
    if source == 'captioner_cmd':
        return CommandCaptioner(args.captioner_cmd, args.caption_timeout)
    if source == 'captioner':
        return load_callable(args.captioner)
    return None


def collect_descriptions(args: argparse.Namespace, source: str, captioner: Optional[Callable],
                         keys: Sequence[str], dataset_dir: Path, errors: LineErrors,
                         output: Optional[str] = None
                         ) -> Tuple[Dict[str, str], Dict[str, object]]:
    """The descriptions from the chosen captioner: read, or produced (and saved) per image.

    `output` (default `args.output`) names the feature file; produced descriptions are saved
    to `<its stem>.descriptions.jsonl` unless --save_descriptions says otherwise.
    """
    output = args.output if output is None else output
    progress = not args.quiet
    if source == 'descriptions':
        return read_descriptions(check_file(args.descriptions, 'a JSON-lines descriptions file'),
                                 errors, progress=progress)
    image_dir = Path(args.image_dir)
    if not image_dir.is_dir():
        raise DataError(f'--image_dir {image_dir} does not exist (or is not a folder)')
    save_to = (Path(args.save_descriptions) if args.save_descriptions
               else dataset_dir / f'{Path(output).stem}.descriptions.jsonl')
    known = read_descriptions(save_to, errors, progress=False)[0] if save_to.is_file() else {}
    return caption_items(keys, captioner, image_dir, args.image_pattern, known=known,
                         save_to=save_to, on_error=args.on_caption_error,
                         pass_item_id=source == 'captioner_cmd', progress=progress)


def write_manifest(out_path: Path, args: argparse.Namespace, argv: Sequence[str],
                   encoder: encoders.Encoder, counts: Dict[str, object], shape: Tuple[int, int],
                   errors: LineErrors) -> Path:
    """`<output stem>.manifest.json` beside the feature file: options, counts, sha256."""
    manifest = writer.base_manifest('features', {k: v for k, v in sorted(vars(args).items())},
                                    [p for p in (args.descriptions,) if p], argv)
    manifest.update({'encoder': encoder.describe(), 'counts': counts,
                     'output': {out_path.name: {'sha256': writer.sha256_file(out_path),
                                                'shape': list(shape)}}})
    if errors.total():
        manifest['malformed_lines'] = errors.summary()
    path = out_path.with_name(f'{out_path.stem}.manifest.json')
    path.write_text(json.dumps(manifest, indent=2) + '\n', encoding='utf-8')
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # Everything that can fail fast does, before any captioning or encoding.
    source = captioner_source(args)
    captioner = make_captioner(args, source)
    dataset_dir = Path(args.dataset_dir)
    name = args.name or dataset_dir.name
    inter = mmrec_files.check_layout(dataset_dir, name)
    n_items = mmrec_files.split_interactions(mmrec_files.read_inter(inter), inter).n_items
    keys = read_item_map(Path(args.item_map) if args.item_map else dataset_dir / ITEM_MAP,
                         n_items)
    out_path = dataset_dir / args.output
    if out_path.exists() and not args.overwrite:
        raise DataError(f'{out_path} already exists; pass --overwrite to replace it')
    encoder = encoders.encoder_from_args(args, progress=not args.quiet)

    errors = LineErrors(skip=args.skip_malformed)
    descriptions, counts = collect_descriptions(args, source, captioner, keys, dataset_dir,
                                                errors)
    if errors.total():
        counts['malformed_lines_skipped'] = errors.total()
    feat, feat_counts = build_features(keys, descriptions, encoder, out_path)
    counts.update(feat_counts)
    save_npy_atomic(out_path, feat)
    write_manifest(out_path, args, argv, encoder, counts, feat.shape, errors)

    print(writer.format_fixes({'dataset': str(dataset_dir), **{
        k: v for k, v in counts.items() if not isinstance(v, list)},
        'output': f'{out_path} {tuple(feat.shape)}'}))
    print(f'train with it as the image modality: python -m lirdrec_jax.main --config '
          f'lirdrec --config.data.data_dir={dataset_dir.parent} '
          f'--config.data.dataset={name} --config.data.image_file={out_path.name}')
    return 0


if __name__ == '__main__':
    sys.exit(main_guard(main))
