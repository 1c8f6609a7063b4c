"""Running the user's own checkout of a PyTorch reference of the MMRec framework
(enoche/LIRDRec, enoche/FREEDOM, ...) on our data.

We never ship or edit the reference's code: its `src/` folder is put on `sys.path` and its
modules are imported from there, after a few compatibility shims for current libraries:

- SciPy removed `dok_matrix._update`, which the reference uses to fill its adjacency matrix.
  Removing the call instead would silently give an EMPTY graph; the shim restores the method
  (a bulk update of the matrix's entry dict).
- NumPy removed the `np.float` alias, which the reference's metrics use.
- `torch.sparse.FloatTensor` (deprecated) is recreated with `torch.sparse_coo_tensor` if absent.
- matplotlib (imported by the trainer only for an optional loss plot) is stubbed if missing.

The reference reads its inputs through a config dict and a data loader; `ReferenceConfig` and
`ReferenceTrainData` / `ReferenceEvalData` provide exactly the fields it reads, built from our
`MMRecDataset`, so both implementations see the same data. The config holds the framework's
keys (`framework_config`) and the model's own (its parity module's `reference_model_config`).
The reference writes its kNN graph cache next to the features; we point it at a temporary
folder holding links to the feature files (and to the model's extra input files), so nothing
is written into the user's data.
"""
import contextlib
import importlib
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Optional

import numpy as np
import scipy.sparse as sp

from lirdrec_jax.data import MMRecDataset


class ReferenceError_(RuntimeError):
    """The reference checkout is missing, incomplete, or cannot be imported."""


def _install_shims() -> None:
    if not hasattr(sp.dok_matrix, '_update'):
        def _update(self, data):
            # SciPy >= 1.12 keeps the entries in `_dict`; older versions were dict subclasses.
            store = getattr(self, '_dict', None)
            (store if store is not None else super(sp.dok_matrix, self)).update(data)
        sp.dok_matrix._update = _update
    if not hasattr(np, 'float'):
        np.float = float  # removed in NumPy 1.24; the reference's metrics use it
    import torch
    if not hasattr(torch.sparse, 'FloatTensor'):
        torch.sparse.FloatTensor = lambda i, v, size: torch.sparse_coo_tensor(
            i, v.float(), size)
    try:
        import matplotlib.pyplot  # noqa: F401
    except ImportError:
        stub = types.ModuleType('matplotlib')
        stub.pyplot = types.ModuleType('matplotlib.pyplot')
        sys.modules.setdefault('matplotlib', stub)
        sys.modules.setdefault('matplotlib.pyplot', stub.pyplot)


@contextlib.contextmanager
def _no_bytecode():
    """Import the reference without writing `__pycache__` folders into the user's checkout."""
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = before


def import_reference_module(name: str):
    """`importlib.import_module(name)` for a module of the reference checkout (no bytecode)."""
    with _no_bytecode():
        return importlib.import_module(name)


def load_reference(checkout: os.PathLike, model_module: str = 'lirdrec',
                   class_name: str = 'LIRDRec',
                   repository: str = 'enoche/LIRDRec') -> types.SimpleNamespace:
    """Import a reference's model, trainer and evaluator modules from a checkout of an
    MMRec-framework repository (enoche/LIRDRec, enoche/FREEDOM, ...).

    Args:
      checkout: the folder of the clone (holding `src/models/<model_module>.py`).
      model_module, class_name: the model's module under `src/models/` and its class.
      repository: named in the error when the checkout is not the expected one.

    Returns:
      A namespace with `Model` (the model class), `Trainer`, `TopKEvaluator`, `metrics`.
    """
    src = Path(checkout) / 'src'
    model_file = src / 'models' / f'{model_module}.py'
    if not model_file.is_file():
        raise ReferenceError_(f'{model_file} not found: --reference must point at a clone of '
                              f'the reference repository {repository} (the folder holding '
                              'src/)')
    try:
        import torch  # noqa: F401
        import torch_dct  # noqa: F401
    except ImportError as err:
        raise ReferenceError_(f'the reference needs {err.name}: pip install -e .[parity]') from err
    _install_shims()
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    try:
        models = import_reference_module(f'models.{model_module}')
        trainer = import_reference_module('common.trainer')
        evaluator = import_reference_module('utils.topk_evaluator')
        metrics = import_reference_module('utils.metrics')
    except ImportError as err:
        raise ReferenceError_(f'cannot import the reference from {src}: {err} (pip install -e '
                              '.[parity] installs what it needs)') from err
    return types.SimpleNamespace(Model=getattr(models, class_name), Trainer=trainer.Trainer,
                                 TopKEvaluator=evaluator.TopKEvaluator, metrics=metrics,
                                 source=src)


class ReferenceConfig(dict):
    """The reference's Config: missing keys read as None (as its `Config.__getitem__` does)."""

    def __missing__(self, key):
        return None


def framework_config(point_cfg, data_path: str, dataset_name: str) -> dict:
    """The keys that the MMRec framework's own classes read, for one of our grid points
    (scalars): `GeneralRecommender.__init__` (ids, device, feature files), `Trainer`
    (optimiser, schedule, epochs, early stopping, evaluation) and `TopKEvaluator` (metrics;
    saving the top-k lists is switched off, so `recommend_topk` is never read). The same in
    every MMRec-framework repository (enoche/LIRDRec, enoche/FREEDOM, ...)."""
    o, t, e = point_cfg.optim, point_cfg.train, point_cfg.eval
    return {
        'dataset': dataset_name, 'data_path': data_path, 'device': 'cpu', 'end2end': False,
        'is_multimodal_model': True,
        'vision_feature_file': point_cfg.data.image_file,
        'text_feature_file': point_cfg.data.text_file,
        'USER_ID_FIELD': 'userID', 'ITEM_ID_FIELD': 'itemID', 'NEG_PREFIX': 'neg__',
        'learner': 'adam', 'learning_rate': o.learning_rate,
        'learning_rate_scheduler': [o.lr_decay_factor, o.lr_decay_epochs],
        'epochs': t.epochs, 'eval_step': t.eval_step, 'stopping_step': t.stopping_step,
        'train_batch_size': t.batch_size, 'clip_grad_norm': None,
        'valid_metric': e.valid_metric, 'valid_metric_bigger': True,
        'eval_batch_size': e.batch_size, 'metrics': [x.capitalize() if x != 'ndcg' and x != 'map'
                                                     else x.upper() for x in e.metrics],
        'topk': list(e.topk), 'save_recommended_topk': False, 'eval_type': None,
    }


def reference_config(point_cfg, data_path: str, dataset_name: str) -> ReferenceConfig:
    """The reference's config dict for one of our grid points (scalars): the framework's keys
    (`framework_config`) and the model's own, from the model's parity module
    (`reference_model_config(point_cfg) -> dict`, which also names the class under 'model'),
    found through the `parity` hook of `point_cfg.model_name`."""
    from lirdrec_jax import models
    hooks = models.get_model(point_cfg.model_name).parity
    if hooks is None:
        raise ReferenceError_(f'model {point_cfg.model_name!r} has no parity module')
    module = importlib.import_module(hooks.module)
    return ReferenceConfig({**framework_config(point_cfg, data_path, dataset_name),
                            **module.reference_model_config(point_cfg)})


class _Counts:
    def __init__(self, n_users, n_items):
        self.n_users, self.n_items = n_users, n_items

    def get_user_num(self):
        return self.n_users

    def get_item_num(self):
        return self.n_items


class ReferenceTrainData:
    """What the reference model reads from its training data loader at construction."""

    def __init__(self, dataset: MMRecDataset):
        self.dataset = _Counts(dataset.n_users, dataset.n_items)
        self._train = dataset.train

    def inter_matrix(self, form='coo', value_field=None):
        del value_field
        mat = sp.coo_matrix((np.ones(self._train.users.size),
                             (self._train.users, self._train.items)),
                            shape=(self.dataset.n_users, self.dataset.n_items))
        return mat if form == 'coo' else mat.tocsr()


class ReferenceEvalData:
    """The reference's EvalDataLoader interface over one of our `EvalSplit`s: batches of
    [user ids, (2, m) mask matrix of (row in batch, training item)] and the ground truth."""

    def __init__(self, split, batch_size: int):
        import torch
        self._torch, self.split, self.batch_size = torch, split, batch_size

    def __iter__(self):
        torch, s = self._torch, self.split
        for start in range(0, s.n_eval, self.batch_size):
            stop = min(start + self.batch_size, s.n_eval)
            lo, hi = s.mask_indptr[start], s.mask_indptr[stop]
            rows = np.repeat(np.arange(stop - start), np.diff(s.mask_indptr[start:stop + 1]))
            mask = np.stack([rows, s.mask_items[lo:hi]]).astype(np.int64)
            yield [torch.from_numpy(s.users[start:stop].astype(np.int64)),
                   torch.from_numpy(mask)]

    def get_eval_items(self):
        s = self.split
        return [s.truth_items[s.truth_indptr[i]:s.truth_indptr[i + 1]] for i in range(s.n_eval)]

    def get_eval_len_list(self):
        return np.asarray(self.split.pos_len)

    def get_eval_users(self):
        return self._torch.from_numpy(self.split.users.astype(np.int64))


def input_file_names(point_cfg) -> dict:
    """The point's model's extra input files (`base.Model.input_files`): config field ->
    file name in the dataset folder; empty for models that read only MMRec's files."""
    from lirdrec_jax import models
    return {f.field: point_cfg.data[f.field]
            for f in models.get_model(point_cfg.model_name).input_files}


def link_files(dataset_dir: Path, folder: Path, names) -> None:
    """Symbolic links in `folder` to the files `names` of `dataset_dir` that exist ('' and
    absent files are skipped: they stay absent for the reference)."""
    for name in names:
        source = Path(dataset_dir) / name
        if name and source.is_file() and not (Path(folder) / name).exists():
            os.symlink(source.absolute(), Path(folder) / name)


def staging_folder(dataset_dir: Path, dataset_name: str, image_file: str, text_file: str,
                   extra_files=()) -> tempfile.TemporaryDirectory:
    """A temporary `<tmp>/<name>/` with links to the feature files and to `extra_files` (the
    model's extra input files, `input_file_names`): the reference reads them there and writes
    its graph caches there, never into the user's data folder."""
    tmp = tempfile.TemporaryDirectory(prefix='lirdrec_parity_')
    folder = Path(tmp.name) / dataset_name
    folder.mkdir()
    link_files(dataset_dir, folder, (image_file, text_file, *extra_files))
    return tmp


def build_reference_model(ref: Optional[types.SimpleNamespace], point_cfg,
                          dataset: MMRecDataset, dataset_dir: Path, seed: int = 0,
                          model_class: Optional[type] = None):
    """Construct the reference model on our data. Returns (model, config, staging tempdir).

    `model_class`, when given, is used instead of `ref.Model` (the tests use an independent
    PyTorch restatement of the model).
    """
    import torch
    torch.manual_seed(seed)
    np.random.seed(seed)
    tmp = staging_folder(dataset_dir, dataset.name, point_cfg.data.image_file,
                         point_cfg.data.text_file,
                         tuple(input_file_names(point_cfg).values()))
    config = reference_config(point_cfg, tmp.name + os.sep, dataset.name)
    cls = model_class or ref.Model
    model = cls(config, ReferenceTrainData(dataset))
    return model, config, tmp


def _stub_image_modules() -> None:
    """utils/dataset.py imports image helpers (torchvision, PIL, lmdb) that the MMRec feature
    datasets never use; stub them when absent so its RecDataset can be imported."""
    for name in ('lmdb',):
        # A stub placed by an earlier call has no __spec__, which find_spec rejects.
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules.setdefault(name, types.ModuleType(name))
    if 'utils.data_utils' not in sys.modules:
        try:
            import_reference_module('utils.data_utils')
        except ImportError:
            stub = types.ModuleType('utils.data_utils')
            for attr in ('ImageResize', 'ImagePad', 'image_to_tensor',
                         'load_decompress_img_from_lmdb_value'):
                setattr(stub, attr, None)
            sys.modules['utils.data_utils'] = stub


def reference_loaders(config: ReferenceConfig, dataset: MMRecDataset) -> tuple:
    """The reference's own TrainDataLoader (its Python negative sampling included) and
    EvalDataLoaders over our splits. Returns (train, valid, test)."""
    import pandas as pd
    _stub_image_modules()
    rec_dataset = import_reference_module('utils.dataset').RecDataset
    loaders = import_reference_module('utils.dataloader')
    config.update({'inter_splitting_label': 'x_label', 'use_full_sampling': False,
                   'use_neg_sampling': True, 'use_neighborhood_loss': False})

    def wrap(split):
        ds = rec_dataset(config, df=pd.DataFrame({'userID': split.users.astype(np.int64),
                                                  'itemID': split.items.astype(np.int64)}))
        ds.user_num, ds.item_num = dataset.n_users, dataset.n_items
        ds.inter_num = len(ds.df)
        return ds

    train, valid, test = wrap(dataset.train), wrap(dataset.valid), wrap(dataset.test)
    train_loader = loaders.TrainDataLoader(config, train, batch_size=config['train_batch_size'],
                                           shuffle=True)
    make_eval = lambda ds: loaders.EvalDataLoader(config, ds, additional_dataset=train,
                                                  batch_size=config['eval_batch_size'])
    return train_loader, make_eval(valid), make_eval(test)


# Trainable tables of the reference model that its forward pass never reads (D4).
UNUSED_REFERENCE_PARAMETERS = ('image_embedding.', 'text_embedding.')


def run_reference_benchmark(checkout, dataset: MMRecDataset, args, point, model_module: str,
                            class_name: str, repository: str = 'enoche/LIRDRec',
                            unused_parameters: tuple = UNUSED_REFERENCE_PARAMETERS) -> dict:
    """Time the reference on `dataset` at our grid point `point`: model construction,
    `args.epochs` training epochs (its own loader and sampling) and valid + test evaluation.

    Args:
      repository: named in the error when the checkout is not the expected one.
      unused_parameters: prefixes of reference parameters left out of the parameter count
        (trainable tables its forward pass never reads).

    Returns:
      {'construct_seconds', 'epoch_seconds': [...], 'eval_seconds', 'parameters'}.
    """
    import time
    import torch
    ref = load_reference(checkout, model_module, class_name, repository)
    with tempfile.TemporaryDirectory(prefix='lirdrec_bench_ref_') as tmp:
        folder = Path(tmp) / dataset.name
        folder.mkdir()
        for name, table in ((point.data.image_file, dataset.image_feat),
                            (point.data.text_file, dataset.text_feat)):
            if name and table is not None:  # an absent modality stays absent for it too
                np.save(folder / name, table)
        for field, name in input_file_names(point).items():  # the model's extra inputs
            value = dataset.extra[field]
            if sp.issparse(value):  # a 'sparse' input file (`base.InputFile.kind`)
                sp.save_npz(folder / name, value)
            else:
                np.save(folder / name, value)
        config = reference_config(point, tmp + os.sep, dataset.name)
        torch.manual_seed(0)
        start = time.perf_counter()
        train_data, valid_data, test_data = reference_loaders(config, dataset)
        model = ref.Model(config, train_data)
        construct = time.perf_counter() - start
        trainer = ref.Trainer(config, model)
        epoch_seconds = []
        for epoch in range(int(getattr(args, 'epochs', 1))):
            start = time.perf_counter()
            model.pre_epoch_processing()
            trainer._train_epoch(train_data, epoch)
            trainer.lr_scheduler.step()
            epoch_seconds.append(time.perf_counter() - start)
        eval_seconds = float('inf')
        for _ in range(getattr(args, 'eval_repeats', 3)):  # best of, as for ours
            start = time.perf_counter()
            trainer.evaluate(valid_data)
            trainer.evaluate(test_data)
            eval_seconds = min(eval_seconds, time.perf_counter() - start)
    return {'construct_seconds': construct, 'epoch_seconds': epoch_seconds,
            'eval_seconds': eval_seconds,
            # Without the tables it registers but never reads (LIRDRec's feature copies,
            # docs/reference_quirks.md D4): the parameters that train, comparable with ours.
            'parameters': int(sum(p.numel() for name, p in model.named_parameters()
                                  if not name.startswith(tuple(unused_parameters))))}
