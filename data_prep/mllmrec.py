"""MLLMRec's two input files, for a dataset folder in MMRec layout.

  python -m data_prep.mllmrec --data_dir DATA --dataset NAME [options]

writes into DATA/NAME/
  image_text_feat.npy        (n_items, d) float32, row i = item i (--items_output)
  user_preferences_feat.npy  (n_users, d) float32, row u = user u (--users_output)
and beside each a `<stem>.manifest.json` (how the rows were made, options, counts, sha256).

Items (--items):
  text          (the default when no captioner option is given; no language model needed)
                the dataset's text_feat.npy rows. That is the metadata half of what the
                reference encodes, and MMRec encoded it with the encoder the reference uses
                (all-MiniLM-L6-v2), so the reference's similarity thresholds (`pure`) keep
                their meaning.
  descriptions  (the default when a captioner option is given) the paper's input: an MLLM's
                description of the item image (from the description stage of
                `python -m data_prep.features`: --descriptions FILE.jsonl, --captioner_cmd or
                --captioner with --image_dir), joined with the item's text, description first
                ('<description> <item text>'), then encoded with --encoder. The item text comes
                from --item_text (JSON lines {"item_id" or "asin": raw id, "text": ...};
                default <dataset>/item_text.jsonl, which `data_prep.amazon` and
                `data_prep.movielens` write). Raw ids are those of i_id_mapping.csv. An item
                with only one of the two is encoded from that one; an item with neither gets
                the mean row (counted).

Users (--profiles), always from the user's TRAINING interactions (x_label 0) only:
  mean          (the default; no language model needed) each user's row is the mean of the
                item rows just written over that user's training items. A user without a
                training interaction gets a zero row (counted, warned).
  text          (the default when a profile option is given) one profile text per user,
                encoded with --encoder, from one of
                --profiles_file FILE.jsonl   lines {"userID": mapped id, "text": ...} or
                                             {"user_id": raw id (u_id_mapping.csv; the mapped
                                             id when the folder has no map), "text": ...},
                                             produced elsewhere (from training data only: this
                                             command cannot check how a file was made);
                --profile_cmd "CMD"          run once per user, the user record (below) as JSON
                                             on stdin; stdout is the profile;
                --profile_callable mod:fn    fn(user_record) -> profile.
                The last two append each profile to a JSON-lines file (default
                <dataset>/<users_output stem>.profiles.jsonl) that a rerun reuses, so an
                interrupted run continues where it stopped. A user with training items but no
                profile gets the mean profile row (counted); a user without training items a
                zero row.
  The user record: {"userID": u, "user_id": raw id, "items": [{"itemID": i, "item_id": raw id,
  "text": item text or null, "description": description or null}, ...]}, the user's training
  items in the order of the .inter file (chronological for the files the data commands write).

Why training interactions only: a profile written from valid or test interactions hands the
held-out items to the model. An open report on the reference's repository
(https://github.com/Yuzhuo-Dang/MLLMRec/issues/6) found that profiles built from every
interaction (x_label 0-2) inflate the results and that training-only profiles help little; the
reference's profile-building code is not released, so its files cannot be checked. The no-LLM
defaults are the builders of `lirdrec_jax.model_inputs`, the same that give the embedded
default dataset these files.

Train:
  python -m lirdrec_jax.main --config mllmrec --config.data.data_dir=DATA \\
      --config.data.dataset=NAME
"""
import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from data_prep import encoders, features, writer
from data_prep.pipeline import main_guard
from data_prep.prepared import Dataset, RawIds, read_dataset, read_raw_ids
from data_prep.readers import LineErrors, check_file
from lirdrec_jax import mmrec_files, model_inputs
from lirdrec_jax.data import DataError
from lirdrec_jax.mmrec_files import warn

ITEMS_OUTPUT, USERS_OUTPUT = (f for f, _ in model_inputs.NO_LLM_FILES)
ITEM_TEXT = writer.ITEM_TEXT
USER_MAP = 'u_id_mapping.csv'
PROFILE_OPTIONS = ('profiles_file', 'profile_cmd', 'profile_callable')
# Between an item's description and its text in the encoder's input.
JOIN = ' '


def train_items_of_users(dataset: Dataset) -> List[List[int]]:
    """Each user's training items, in file order (only x_label 0 rows: never valid/test)."""
    lists: List[List[int]] = [[] for _ in range(dataset.n_users)]
    for u, i in zip(dataset.train_users.tolist(), dataset.train_items.tolist()):
        lists[u].append(i)
    return lists


# --------------------------------------------------------------------------- items


def join_item_input(description: Optional[str], text: Optional[str]) -> Optional[str]:
    """The encoder's input of one item: '<description> <item text>', or the one that is there
    (blank counts as absent), or None."""
    parts = [p.strip() for p in (description, text) if p is not None and p.strip()]
    return JOIN.join(parts) if parts else None


def read_item_texts(path: Path, keys: Sequence[str], errors: LineErrors, progress: bool
                    ) -> Tuple[Dict[str, str], Dict[str, int]]:
    """raw item id -> item text from a JSON-lines file (the descriptions' format)."""
    texts, counts = features.read_descriptions(path, errors, progress=progress)
    known = set(keys)
    unknown = [k for k in texts if k not in known]
    if texts and len(unknown) == len(texts):
        raise DataError(f'{path}: none of its {len(texts)} item ids is a raw item id of '
                        f'{features.ITEM_MAP} (first ids in the file: {unknown[:3]}; in the map: '
                        f'{list(keys[:3])}); expected the item texts of this dataset')
    return texts, {'item_text_duplicates_ignored': counts['duplicate_descriptions_ignored'],
                   'item_texts_for_unknown_items': len(unknown)}


def build_item_inputs(keys: Sequence[str], descriptions: Dict[str, str],
                      item_texts: Dict[str, str]) -> Tuple[List[Optional[str]], Dict[str, int]]:
    """Each item's encoder input (`join_item_input`), itemID order, and what each one held."""
    inputs, counts = [], {'items_description_and_text': 0, 'items_description_only': 0,
                          'items_text_only': 0, 'items_neither_mean_filled': 0}
    for key in keys:
        d, t = descriptions.get(key), item_texts.get(key)
        has_d, has_t = bool(d and d.strip()), bool(t and t.strip())
        kind = ('items_description_and_text' if has_d and has_t else 'items_description_only'
                if has_d else 'items_text_only' if has_t else 'items_neither_mean_filled')
        counts[kind] += 1
        inputs.append(join_item_input(d, t))
    return inputs, counts


def encode_items(inputs: List[Optional[str]], encoder: encoders.Encoder, out_path: Path
                 ) -> np.ndarray:
    """(n_items, d) float32 encoded item inputs (mean row where None), checked as training
    checks item features."""
    try:
        feat, _ = encoders.encode_item_texts(encoder, inputs)
    except ValueError as e:
        raise DataError(f'{out_path}: {e}; expected descriptions or item texts keyed by the raw '
                        f'item ids of {features.ITEM_MAP}') from None
    return mmrec_files.validate_features(feat, out_path, len(inputs))


def text_item_rows(dataset: Dataset, text_file: str) -> np.ndarray:
    """--items text: the dataset's text-feature rows (`model_inputs.no_llm_item_rows`)."""
    path = dataset.folder / text_file
    if not path.is_file():
        raise DataError(f'{path} does not exist; --items text copies the dataset\'s text '
                        f'features (MMRec\'s text_feat.npy, --text_file); give a captioner '
                        f'option (--descriptions, --captioner_cmd, --captioner) for --items '
                        f'descriptions instead')
    return model_inputs.no_llm_item_rows(mmrec_files.load_features(path, dataset.n_items))


# --------------------------------------------------------------------------- users


class ProfileCommand:
    """Runs a command per user; the user record goes to its stdin as JSON, its standard output
    is the profile. No shell runs (the command line is split like a shell would).

    Args:
      template: the command line.
      timeout: seconds per user.
    """

    def __init__(self, template: str, timeout: float = 600.0):
        self.argv = shlex.split(template)
        if not self.argv:
            raise DataError('--profile_cmd is empty; expected a command line, e.g. '
                            '"my-llm --task profile"')
        self.timeout = timeout

    def __call__(self, record: dict) -> str:
        return features.run_command(self.argv, self.timeout,
                                    stdin=json.dumps(record, ensure_ascii=False))


# The raw id of each user (u_id_mapping.csv, or the mapped id as a string when the folder has
# none).
UserIds = RawIds


def _user_of(record: dict, ids: UserIds, n_users: int) -> Tuple[Optional[int], str]:
    """(mapped user id or None, problem) of one profile line."""
    if 'userID' in record:
        value = record['userID']
        if isinstance(value, bool) or not isinstance(value, (int, str)) \
                or not str(value).strip().isdigit():
            return None, f'field userID is {value!r}; expected a mapped user id (an integer)'
        u = int(value)
        if u >= n_users:
            return None, (f'field userID is {u}; expected a mapped user id in 0..{n_users - 1} '
                          f'(the .inter file\'s userID)')
        return u, ''
    value = record.get('user_id')
    if value is None or isinstance(value, (dict, list, bool)):
        return None, 'expected {"userID": mapped id or "user_id": raw id, "text": string}'
    u = ids.index.get(str(value))
    if u is None:
        where = (f'a raw user id of {USER_MAP}' if ids.from_map else
                 f'a mapped user id in 0..{n_users - 1} (the folder has no {USER_MAP})')
        return None, f'field user_id is {value!r}; expected {where}'
    return u, ''


def read_profiles(path: Path, ids: UserIds, n_users: int, errors: LineErrors,
                  progress: bool = True) -> Tuple[Dict[int, str], Dict[str, int]]:
    """mapped user id -> profile text, from JSON lines (see the module docstring). The first
    profile of a user wins; later ones are counted."""
    def user_of(record):  # every line naming no user of the dataset is malformed here
        user, problem = _user_of(record, ids, n_users)
        return user, None, problem
    read = features.read_keyed_texts(path, errors, user_of, progress)
    return read.texts, {'duplicate_profiles_ignored': read.duplicates}


def user_record(u: int, items: Sequence[int], ids: UserIds, item_keys: Optional[Sequence[str]],
                item_texts: Dict[str, str], descriptions: Dict[str, str]) -> dict:
    """What a profile generator sees of user `u`: its training items only."""
    def item(i):
        key = item_keys[i] if item_keys is not None else None
        return {'itemID': i, 'item_id': key,
                'text': item_texts.get(key) if key is not None else None,
                'description': descriptions.get(key) if key is not None else None}
    return {'userID': u, 'user_id': ids.raw[u], 'items': [item(i) for i in items]}


def generate_profiles(args, generator: Callable[[dict], str], lists: List[List[int]],
                      ids: UserIds, item_keys, item_texts, descriptions, save_to: Path,
                      errors: LineErrors) -> Tuple[Dict[int, str], Dict[str, object]]:
    """Profiles of every user with training items, reused from `save_to` or produced (and
    appended to it) by the generator."""
    known = (read_profiles(save_to, ids, len(lists), errors, progress=False)[0]
             if save_to.is_file() else {})
    todo = [str(u) for u in range(len(lists)) if lists[u] and u not in known]
    option = '--profile_cmd' if args.profile_cmd else '--profile_callable'
    produced = features.produce_texts(
        todo, lambda key: generator(user_record(int(key), lists[int(key)], ids, item_keys,
                                                item_texts, descriptions)),
        save_to=save_to,
        line=lambda key, text: {'userID': int(key), 'user_id': ids.raw[int(key)], 'text': text},
        on_error=args.on_profile_error,
        label=lambda key: f'user {int(key)} ({ids.raw[int(key)]!r})', what=option,
        skip_hint='pass --on_profile_error skip to count such users and give them the mean '
                  'profile row',
        desc='writing user profiles', progress=not args.quiet)
    texts = {u: t for u, t in known.items() if u < len(lists) and lists[u]}
    texts.update({int(k): t for k, t in produced.texts.items()})
    counts: Dict[str, object] = {'profiles_reused': len(texts) - len(produced.texts),
                                 'profiles_produced': len(produced.texts),
                                 'profile_failures': len(produced.failures)}
    if produced.failures:
        counts['profile_failures_first'] = produced.failures[:features.MAX_REPORTED]
    return texts, counts


def encode_profiles(texts: Dict[int, str], lists: List[List[int]], encoder: encoders.Encoder,
                    out_path: Path) -> Tuple[np.ndarray, Dict[str, int]]:
    """(n_users, d) float32 encoded profiles: users with training items and a profile get its
    encoding, those without a profile the mean of those rows, users without training items a
    zero row."""
    has_train = np.array([bool(items) for items in lists], dtype=bool)
    ordered = [texts.get(u) if has_train[u] else None for u in range(len(lists))]
    present = np.array([t is not None and bool(t.strip()) for t in ordered], dtype=bool)
    if not present.any():
        raise DataError(f'{out_path}: no user with training interactions has a profile text; '
                        f'expected profiles keyed by the user ids of this dataset')
    vectors = encoder.encode([t for t, p in zip(ordered, present) if p])
    rows = np.zeros((len(lists), vectors.shape[1]), dtype=np.float32)
    rows[present] = vectors
    missing = has_train & ~present
    rows[missing] = vectors.astype(np.float64).mean(axis=0).astype(np.float32)
    return rows, {'users_profile_encoded': int(present.sum()),
                  'users_without_profile_mean_filled': int(missing.sum()),
                  'profiles_of_users_without_training_items_ignored': int(
                      sum(1 for u in texts if u < len(lists) and not has_train[u]))}


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m data_prep.mllmrec',
        description='MLLMRec\'s inputs for an MMRec-layout dataset: image_text_feat.npy (one '
                    'row per item) and user_preferences_feat.npy (one row per user, from '
                    'training interactions only). The defaults need no language model.')
    parser.add_argument('--data_dir', required=True, help='folder holding <dataset>/')
    parser.add_argument('--dataset', required=True, help='dataset name (the .inter stem)')
    parser.add_argument('--write', choices=('both', 'items', 'users'), default='both',
                        help='which file(s) to write; users alone reads the existing items file '
                             'for --profiles mean')
    g = parser.add_argument_group('items')
    g.add_argument('--items', choices=('text', 'descriptions'), default=None,
                   help='text: the text_feat.npy rows (default without a captioner option); '
                        'descriptions: MLLM image descriptions joined with the item text, '
                        'encoded (default with one)')
    g.add_argument('--text_file', default='text_feat.npy', help='--items text: its source')
    g.add_argument('--item_text', default=None,
                   help=f'JSON lines {{"item_id" or "asin": raw id, "text": ...}} (default '
                        f'<dataset>/{ITEM_TEXT}, written by data_prep.amazon / movielens)')
    g.add_argument('--item_map', default=None,
                   help=f'raw item ids (default <dataset>/{features.ITEM_MAP})')
    g.add_argument('--items_output', default=ITEMS_OUTPUT, help=f'default {ITEMS_OUTPUT}')
    features.add_captioner_args(parser)
    g = parser.add_argument_group('users')
    g.add_argument('--profiles', choices=('mean', 'text'), default=None,
                   help='mean: each user\'s mean item row over its training items (default '
                        'without a profile option); text: encoded profile texts (default with '
                        'one)')
    g.add_argument('--profiles_file', default=None,
                   help='JSON lines {"userID": mapped id or "user_id": raw id, "text": profile}')
    g.add_argument('--profile_cmd', default=None,
                   help='command run per user: the user record as JSON on stdin, the profile '
                        'on stdout')
    g.add_argument('--profile_callable', default=None,
                   help='Python callable module:function(user_record) -> profile text')
    g.add_argument('--save_profiles', default=None,
                   help='JSON-lines file generated profiles are appended to and reused from '
                        '(default <dataset>/<users_output stem>.profiles.jsonl)')
    g.add_argument('--on_profile_error', choices=('stop', 'skip'), default='stop',
                   help='stop at a failing user (default) or count it and use the mean row')
    g.add_argument('--profile_timeout', type=float, default=600.0,
                   help='seconds per user for --profile_cmd')
    g.add_argument('--users_output', default=USERS_OUTPUT, help=f'default {USERS_OUTPUT}')
    parser.add_argument('--overwrite', action='store_true', help='replace existing outputs')
    parser.add_argument('--skip_malformed', action='store_true',
                        help='skip and count malformed lines of the JSON-lines inputs')
    parser.add_argument('--quiet', action='store_true', help='no progress lines on stderr')
    encoders.add_encoder_args(parser)
    return parser


class Plan(NamedTuple):
    """The modes the command line asked for, checked before any input is read."""
    items: str
    caption_source: Optional[str]
    profiles: str
    profile_source: Optional[str]


def plan_of(args) -> Plan:
    """The items and users modes (explicit, or implied by the options given), checked."""
    captions = [n for n in features.CAPTIONER_OPTIONS if getattr(args, n)]
    items = args.items or ('descriptions' if captions else 'text')
    source = None
    if items == 'descriptions':
        source = features.captioner_source(args)
    elif captions:
        raise DataError(f'--items text does not use --{captions[0]}; drop it or pass --items '
                        f'descriptions')
    given = [n for n in PROFILE_OPTIONS if getattr(args, n)]
    profiles = args.profiles or ('text' if given else 'mean')
    if profiles == 'text' and len(given) != 1:
        raise DataError(f'--profiles text needs exactly one of --profiles_file, --profile_cmd, '
                        f'--profile_callable (got {["--" + n for n in given] or "none"})')
    if profiles == 'mean' and given:
        raise DataError(f'--profiles mean does not use --{given[0]}; drop it or pass --profiles '
                        f'text')
    return Plan(items, source, profiles, given[0] if profiles == 'text' else None)


def write_output(run: 'Run', out_path: Path, array: np.ndarray, rows_are: str,
                 encoder: Optional[encoders.Encoder], counts: Dict[str, object]) -> None:
    """The array (atomically) and `<stem>.manifest.json` beside it: how the rows were made,
    the options, the counts, the output's sha256."""
    model_inputs.save_npy_atomic(out_path, array)
    manifest = writer.base_manifest('mllmrec', {k: v for k, v in sorted(vars(run.args).items())},
                                    [p for p in run.inputs if p], run.argv)
    manifest.update({'rows': rows_are, 'modes': run.plan._asdict(),
                     'encoder': encoder.describe() if encoder is not None else None,
                     'counts': counts,
                     'output': {out_path.name: {'sha256': writer.sha256_file(out_path),
                                                'shape': list(array.shape)}}})
    if run.errors.total():
        manifest['malformed_lines'] = run.errors.summary()
    path = out_path.with_name(f'{out_path.stem}.manifest.json')
    path.write_text(json.dumps(manifest, indent=2) + '\n', encoding='utf-8')


ITEM_ROWS = {
    'text': 'the dataset\'s text-feature rows (the item metadata encoded by MMRec); no language '
            'model',
    'descriptions': 'MLLM image description joined with the item text ("<description> <item '
                    'text>"), encoded; mean row for items with neither',
}
USER_ROWS = {
    'mean': 'mean of the item rows ({items}) over each user\'s training interactions (x_label '
            '0; valid and test never used); zero row for users without one; no language model',
    'text': 'encoded profile text of each user, generated from its training interactions '
            '(x_label 0) only; mean profile row for users without a profile, zero row for '
            'users without training interactions',
}


class Run(NamedTuple):
    """One run of the command: its options, plan, dataset and what it read."""
    args: argparse.Namespace
    argv: List[str]
    plan: Plan
    dataset: Dataset
    encoder: Optional[encoders.Encoder]
    errors: LineErrors
    item_keys: Optional[List[str]]
    item_texts: Dict[str, str]
    descriptions: Dict[str, str]
    inputs: List[Optional[str]]


def read_item_side(args, plan: Plan, dataset: Dataset, captioner, errors: LineErrors,
                   do_items: bool) -> Tuple[Optional[List[str]], Dict[str, str], Dict[str, str],
                                            Dict[str, object], Optional[Path]]:
    """Raw item ids, item texts and descriptions, each read (or produced) only when used.

    Returns:
      (raw item ids or None, raw id -> item text, raw id -> description, counts, the item
      text file read or None).
    """
    folder, progress = dataset.folder, not args.quiet
    needs_keys = plan.items == 'descriptions' or plan.profiles == 'text'
    if args.item_text and not needs_keys:
        raise DataError('--item_text is read by --items descriptions (joined with the '
                        'descriptions) and --profiles text (shown to the profile generator); '
                        'neither is asked for')
    item_text_path = Path(args.item_text) if args.item_text else folder / ITEM_TEXT
    keys, texts, descriptions, counts, read_from = None, {}, {}, {}, None
    if needs_keys:
        map_path = Path(args.item_map) if args.item_map else folder / features.ITEM_MAP
        if plan.items == 'descriptions' or args.item_text or map_path.is_file():
            keys = features.read_item_map(map_path, dataset.n_items)
    if keys is not None and (args.item_text or item_text_path.is_file()):
        read_from = check_file(item_text_path, 'JSON lines {"item_id": raw id, "text": item '
                                               'text}')
        texts, counts = read_item_texts(read_from, keys, errors, progress)
    elif plan.items == 'descriptions' and do_items:
        check_file(item_text_path, f'the item texts the descriptions are joined with (JSON lines '
                                   f'{{"item_id": raw id, "text": ...}}; data_prep.amazon and '
                                   f'movielens write {ITEM_TEXT}; pass --item_text FILE)')
    if plan.items == 'descriptions' and (do_items or plan.profiles == 'text'):
        descriptions, desc_counts = features.collect_descriptions(
            args, plan.caption_source, captioner, keys, folder, errors, output=args.items_output)
        counts.update(desc_counts)
    return keys, texts, descriptions, counts, read_from


def make_items(run: Run, counts: Dict[str, object]) -> np.ndarray:
    """The item rows of the plan (see the module docstring); `counts` is filled in."""
    if run.plan.items == 'text':
        counts['items'] = run.dataset.n_items
        return text_item_rows(run.dataset, run.args.text_file)
    texts, join_counts = build_item_inputs(run.item_keys, run.descriptions, run.item_texts)
    counts.update(join_counts)
    counts['descriptions_for_unknown_items'] = len(set(run.descriptions) - set(run.item_keys))
    return encode_items(texts, run.encoder, run.dataset.folder / run.args.items_output)


def make_users(run: Run, items: Optional[np.ndarray], generator, counts: Dict[str, object]
               ) -> np.ndarray:
    """The user rows of the plan, from training interactions only; `counts` is filled in.
    `items`: the item rows just made (None = read the existing items file)."""
    args, dataset = run.args, run.dataset
    folder = dataset.folder
    users_path = folder / args.users_output
    lists = train_items_of_users(dataset)
    empty = sum(not x for x in lists)
    counts.update({'users': dataset.n_users,
                   'users_without_training_interactions_zero_row': empty})
    if run.plan.profiles == 'mean':
        if items is None:
            items_path = folder / args.items_output
            items = model_inputs.validate_input_rows(
                _load_items_file(items_path), str(items_path), 'items', dataset.n_items,
                f'python -m data_prep.mllmrec --data_dir {args.data_dir} --dataset '
                f'{args.dataset} --write items')
        users, _ = model_inputs.mean_user_rows(items, dataset.train_users, dataset.train_items,
                                               dataset.n_users)
    else:
        ids = read_raw_ids(folder / USER_MAP, dataset.n_users, 'userID')
        if run.plan.profile_source == 'profiles_file':
            texts, more = read_profiles(check_file(args.profiles_file, 'JSON lines of user '
                                                   'profiles'), ids, dataset.n_users,
                                        run.errors, not args.quiet)
        else:
            save_to = (Path(args.save_profiles) if args.save_profiles else
                       folder / f'{Path(args.users_output).stem}.profiles.jsonl')
            texts, more = generate_profiles(args, generator, lists, ids, run.item_keys,
                                            run.item_texts, run.descriptions, save_to,
                                            run.errors)
        counts.update(more)
        users, more = encode_profiles(texts, lists, run.encoder, users_path)
        counts.update(more)
    if empty:
        warn(f'{users_path}: {empty} user(s) have no training interaction; their rows are zero')
    return model_inputs.validate_input_rows(users, str(users_path), 'users', dataset.n_users,
                                            'python -m data_prep.mllmrec')


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # Everything that can fail fast does, before any generation or encoding.
    plan = plan_of(args)
    captioner = (features.make_captioner(args, plan.caption_source) if plan.caption_source
                 else None)
    generator = None
    if plan.profile_source == 'profile_cmd':
        generator = ProfileCommand(args.profile_cmd, args.profile_timeout)
    elif plan.profile_source == 'profile_callable':
        generator = features.load_callable(args.profile_callable, '--profile_callable')
    dataset = read_dataset(args.data_dir, args.dataset)
    do_items, do_users = args.write in ('both', 'items'), args.write in ('both', 'users')
    items_path = dataset.folder / args.items_output
    users_path = dataset.folder / args.users_output
    for path in ([items_path] if do_items else []) + ([users_path] if do_users else []):
        if path.exists() and not args.overwrite:
            raise DataError(f'{path} already exists; pass --overwrite to replace it')
    needs_encoder = ((do_items and plan.items == 'descriptions')
                     or (do_users and plan.profiles == 'text'))
    encoder = encoders.encoder_from_args(args, progress=not args.quiet) if needs_encoder else None
    errors = LineErrors(skip=args.skip_malformed)
    keys, texts, descriptions, item_counts, text_file = read_item_side(
        args, plan, dataset, captioner, errors, do_items)
    run = Run(args, argv, plan, dataset, encoder, errors, keys, texts, descriptions,
              [args.descriptions, args.profiles_file, text_file and str(text_file)])

    summary: Dict[str, object] = {'dataset': str(dataset.folder), 'users': dataset.n_users,
                                  'items': dataset.n_items,
                                  'training interactions': int(dataset.train_users.size)}
    # Both matrices are made before either is written: a failure leaves no half-made pair.
    items = make_items(run, item_counts) if do_items else None
    user_counts: Dict[str, object] = {}
    users = make_users(run, items, generator, user_counts) if do_users else None
    if do_items:
        write_output(run, items_path, items, ITEM_ROWS[plan.items],
                     encoder if plan.items == 'descriptions' else None, item_counts)
        summary['items output'] = f'{items_path} {tuple(items.shape)} ({plan.items})'
        summary.update({k: v for k, v in item_counts.items() if not isinstance(v, list)})
    if do_users:
        write_output(run, users_path, users,
                     USER_ROWS[plan.profiles].format(items=items_path.name),
                     encoder if plan.profiles == 'text' else None, user_counts)
        summary['users output'] = f'{users_path} {tuple(users.shape)} ({plan.profiles})'
        summary.update({k: v for k, v in user_counts.items() if not isinstance(v, list)})
    if errors.total():
        summary['malformed lines skipped'] = errors.total()
    print(writer.format_fixes(summary))
    print(f'train: python -m lirdrec_jax.main --config mllmrec '
          f'--config.data.data_dir={args.data_dir} --config.data.dataset={args.dataset}'
          + (f' --config.data.image_text_file={args.items_output}'
             if args.items_output != ITEMS_OUTPUT else '')
          + (f' --config.data.user_profile_file={args.users_output}'
             if args.users_output != USERS_OUTPUT else ''))
    return 0


def _load_items_file(path: Path) -> np.ndarray:
    """The existing items file (for --write users --profiles mean)."""
    check_file(path, 'the items file the user rows average (write it first: --write items)')
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:  # any failure means the file is not a usable .npy array
        raise DataError(f'{path}: cannot be loaded as a .npy array ({type(e).__name__}: {e})'
                        ) from e


if __name__ == '__main__':
    sys.exit(main_guard(main))
