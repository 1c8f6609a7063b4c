"""A whole run: load data, train every grid point, report and save the results.

Run directory layout (under `checkpoint.output_dir`):
  <run_name>/config.json              the full config of the run
  <run_name>/run.lock                 while a process writes the run (rundir.RunLock)
  <run_name>/point-NNN/config.json    the point's config
  <run_name>/point-NNN/metrics.jsonl  one JSON line per epoch
  <run_name>/point-NNN/ckpt/{last,best}/<epochs done>/   orbax checkpoints
  <run_name>/point-NNN/ckpt/{unreadable,superseded}/     set aside on resume (checkpointing.py)
  <run_name>/point-NNN/test_users.npz the test users' own metrics at the best valid epoch
                                      (rundir.TEST_USERS_FILE; for significance tests)
  <run_name>/point-NNN/result.json    written when the point has finished
  <run_name>/results.json             all points, the best one, the popularity baseline, the
                                      dataset's split (data.split_summary)

Every point runs on all devices (`parallel` section). With `sweep.mode = 'vmapped'`, points
that differ only in numeric hyper-parameters train side by side in one compiled program
(sweep.py); results and files per point are the same as in sequential mode. In a multi-process
run every process executes this same function; only process 0 writes files and logs.
"""
import datetime
import json
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import ml_collections

from lirdrec_jax import data as data_lib
from lirdrec_jax import (evaluation, grid, model_inputs, models, parallel, progress, reporting,
                         rundir, storage, sweep, train)

# Keys whose change between the interrupted and the resumed run is harmless: where the run
# writes, and how it is spread over devices and sweep groups (the same numbers up to float32
# rounding; checkpoints have the same format).
RESUME_IGNORED = ('resume', 'checkpoint', 'parallel', 'sweep')


def load_dataset(data_cfg, input_files=()) -> data_lib.MMRecDataset:
    """The configured dataset; the embedded synthetic one is generated on first use.

    Args:
      data_cfg: the config's `data` section.
      input_files: the model's extra input files (`base.Model.input_files`), read from the
        dataset folder into `dataset.extra` (see `lirdrec_jax.model_inputs`).
    """
    data_dir, name = data_cfg.data_dir, data_cfg.dataset
    if not data_dir:
        if name != 'synthetic':
            raise ValueError(f'data.data_dir is empty, but dataset {name!r} is not the embedded '
                             'one: pass --config.data.data_dir=/path/to/mmrec/data')
        from lirdrec_jax import synthetic
        data_dir, name = synthetic.ensure_default_dataset()
    dataset = data_lib.load_mmrec(data_dir, name, image_file=data_cfg.image_file,
                                  text_file=data_cfg.text_file,
                                  cache_dir=data_cfg.cache_dir or None)
    if not input_files:
        return dataset
    extra = model_inputs.read_input_files(input_files, data_cfg, data_dir, name,
                                          dataset.n_users, dataset.n_items)
    return dataset._replace(extra=model_inputs.as_mapping(extra))


def run_directory(cfg, partitioner: parallel.Partitioner = None) -> Path:
    """Where this run writes: the named run (`checkpoint.run_name`), or with `resume` the newest
    run of this model and dataset that holds a checkpoint or a result (a start that failed
    before training leaves only config files and is passed over), or a new timestamped
    directory. All processes of a multi-process run agree on process 0's timestamp."""
    root = Path(cfg.checkpoint.output_dir)
    prefix = rundir.run_prefix(cfg.model_name, cfg.data.dataset)
    if cfg.checkpoint.run_name:
        return root / cfg.checkpoint.run_name
    if cfg.resume:
        previous = rundir.latest_resumable(root, cfg.model_name, cfg.data.dataset)
        if previous is None:
            raise FileNotFoundError(f'resume=True but no earlier run {prefix}-* under {root} '
                                    'holds a checkpoint; start without --config.resume=True')
        return previous
    stamp = datetime.datetime.now().strftime('%Y%m%d%H%M%S')
    if partitioner is not None:
        stamp = str(partitioner.agree(int(stamp)))
    stamp = f'{stamp[:8]}-{stamp[8:]}'
    path = root / f'{prefix}-{stamp}'
    suffix = 1
    while path.exists():  # never reuse (and so never overwrite) an existing run
        path = root / f'{prefix}-{stamp}-{suffix}'
        suffix += 1
    if partitioner is not None:
        suffix = partitioner.agree(suffix)
        path = root / (f'{prefix}-{stamp}' + (f'-{suffix - 1}' if suffix > 1 else ''))
    return path


def _check_resumable(saved_path: Path, cfg_dict: dict) -> None:
    """Refuse to resume a run whose saved config differs (outside RESUME_IGNORED)."""
    saved = json.loads(saved_path.read_text())
    current = json.loads(json.dumps(cfg_dict))  # tuples -> lists, as saved
    diff = sorted(k for k in set(saved) | set(current)
                  if k not in RESUME_IGNORED and saved.get(k) != current.get(k))
    if diff:
        raise ValueError(f'cannot resume {saved_path.parent}: its config differs from this one '
                         f'in {diff}; resume with the same config, or start a new run')


# What to do when a write fails for lack of space or permission (storage.translated).
STORAGE_REMEDY = ('choose another --config.checkpoint.output_dir; checkpoints written before '
                  'are intact, and --config.resume=True continues from them')


def run(cfg: ml_collections.ConfigDict, *, stop_after_epochs=None) -> dict:
    """Train all grid points of `cfg`; returns the summary also written to results.json.

    Everything that can be checked (config values, the data, the config values that depend on
    the data) is checked before anything is written. File-system failures raise
    storage.StorageError naming the path and the remedy.
    """
    # Before anything touches JAX: join the other processes of a multi-process run.
    parallel.initialize_distributed(cfg.parallel.distributed)
    model = models.get_model(cfg.model_name)  # unknown: an error before anything is written
    sweep.check_sweep_config(cfg.sweep)
    points = grid.expand_grid(cfg)
    partitioner = train.create_partitioner(cfg.parallel)
    primary = partitioner.is_primary
    log = reporting.log if primary else (lambda message: None)
    # Every process loads the data (and draws the same batches).
    dataset = load_dataset(cfg.data, model.input_files)
    for point in points:
        train.check_point_config(point.config, dataset.n_users, dataset.n_items)
    prepared = train.prepare_data(dataset, cfg.model_name)
    workdir = run_directory(cfg, partitioner)
    resume = _check_run_directory(cfg, workdir)  # on every process, before any writes
    with storage.translated(STORAGE_REMEDY):
        if not primary:
            partitioner.barrier('run directory opened')
            return _train_run(cfg, points, prepared, workdir, resume, partitioner, log,
                              stop_after_epochs)
        workdir.mkdir(parents=True, exist_ok=True)
        with rundir.RunLock(workdir, log):
            _open_run(cfg, workdir, resume, log)
            partitioner.barrier('run directory opened')
            return _train_run(cfg, points, prepared, workdir, resume, partitioner, log,
                              stop_after_epochs)


def _check_run_directory(cfg, workdir: Path) -> bool:
    """Whether the run resumes: the directory holds work (a checkpoint or a result) and
    `resume` is set. Work without `resume`, or with a config that differs, is an error; a
    directory holding only config files (a start that failed early) is started again."""
    has_work = workdir.is_dir() and rundir.holds_work(workdir)
    if has_work and not cfg.resume:
        raise FileExistsError(f'{workdir} already holds a run; pass --config.resume=True to '
                              'continue it, or choose another --config.checkpoint.run_name')
    if has_work:
        _check_resumable(workdir / 'config.json', cfg.to_dict())
    return has_work


def _open_run(cfg, workdir: Path, resume: bool, log) -> None:
    """Say which run this is (and, resuming, where each point stands); write its config."""
    if resume:
        log(f'resuming run {workdir}: {rundir.describe_states(rundir.point_states(workdir))}')
    else:
        if cfg.resume:
            log(f'run {workdir} holds no checkpoint yet: starting it')
        log(f'run directory: {workdir}')
    reporting.write_json(workdir / 'config.json', cfg.to_dict())


def _train_run(cfg, points, prepared, workdir: Path, resume: bool,
               partitioner: parallel.Partitioner, log, stop_after_epochs) -> dict:
    """The grid points of an opened run directory, the summary and the results table."""
    log(f'devices: {partitioner.describe()}')
    dataset = prepared.dataset
    log(data_lib.describe(dataset))
    metrics, ks = tuple(m.lower() for m in cfg.eval.metrics), tuple(cfg.eval.topk)
    popularity = {
        split: evaluation.evaluate_popularity(dataset.train.items, dataset.n_items,
                                              getattr(prepared, split), metrics=metrics, ks=ks,
                                              partitioner=partitioner)
        for split in ('valid', 'test')}

    context = _RunContext(len(points), prepared, workdir, resume, stop_after_epochs,
                          partitioner, log)
    with progress.bar(len(points), 'grid', unit='point', leave=True,
                      shown=len(points) > 1) as points_bar:
        if cfg.sweep.mode == 'vmapped':
            by_index = {}
            for group in sweep.group_points(points, int(cfg.sweep.max_points)):
                by_index.update(_run_group(group, context))
                points_bar.update(len(group))
            results = [by_index[point.index] for point in points]
        else:
            results = []
            for point in points:
                results.append(_run_point(point, context))
                points_bar.update()
    summary = _summarise(cfg, results, popularity, data_lib.split_summary(dataset))
    if partitioner.is_primary:
        reporting.write_json(workdir / 'results.json', summary)
        _print_summary(cfg, summary)
    return summary


class _RunContext(NamedTuple):
    n_points: int
    prepared: train.PreparedData
    workdir: Path
    resume: bool
    stop_after_epochs: Optional[int]
    partitioner: parallel.Partitioner
    log: Callable[[str], None]


def _label(point) -> str:
    return ', '.join(f'{k}={v}' for k, v in point.values.items())


def _open_point(point, ctx: _RunContext) -> Optional[dict]:
    """Prepares the point's directory; returns its saved result if it finished earlier."""
    point_dir = ctx.workdir / f'point-{point.index:03d}'
    result_path = point_dir / 'result.json'
    if ctx.resume and result_path.exists():
        ctx.log(f'=== point {point.index + 1}/{ctx.n_points}: {_label(point)} (finished earlier)')
        return json.loads(result_path.read_text())
    if ctx.resume and (point_dir / 'config.json').exists():
        _check_resumable(point_dir / 'config.json', point.config.to_dict())
    if ctx.partitioner.is_primary:
        point_dir.mkdir(parents=True, exist_ok=True)
        reporting.write_json(point_dir / 'config.json', point.config.to_dict())
    return None


def _close_point(point, outcome: dict, seconds: float, ctx: _RunContext) -> dict:
    result = {'index': point.index, 'values': point.values, 'seconds': seconds, **outcome}
    if outcome['finished'] and ctx.partitioner.is_primary:
        reporting.write_json(ctx.workdir / f'point-{point.index:03d}' / 'result.json', result)
    return result


def _run_point(point, ctx: _RunContext) -> dict:
    earlier = _open_point(point, ctx)
    if earlier is not None:
        return earlier
    ctx.log(f'=== point {point.index + 1}/{ctx.n_points}: {_label(point)}')
    start = time.perf_counter()
    outcome = train.train_points([point.config], ctx.prepared,
                                 [ctx.workdir / f'point-{point.index:03d}'], resume=ctx.resume,
                                 stop_after_epochs=ctx.stop_after_epochs,
                                 partitioner=ctx.partitioner)[0]
    if outcome.get('diverged'):
        # Like the reference, a diverged point does not stop the grid; it is reported as such.
        ctx.log(f'point {point.index + 1} diverged: {outcome["diverged"]}')
    return _close_point(point, outcome, time.perf_counter() - start, ctx)


def _run_group(group, ctx: _RunContext) -> dict:
    """One vmapped group; {point index: result}. Its progress lines carry the point number."""
    results, todo = {}, []
    for point in group:
        earlier = _open_point(point, ctx)
        if earlier is not None:
            results[point.index] = earlier
        else:
            todo.append(point)
    if not todo:
        return results
    numbers = ', '.join(str(p.index + 1) for p in todo)
    ctx.log(f'=== points {numbers} of {ctx.n_points}, side by side (vmapped):')
    for point in todo:
        ctx.log(f'    point {point.index + 1}: {_label(point)}')
    start = time.perf_counter()
    outcomes = sweep.train_group([p.config for p in todo], ctx.prepared,
                                 [ctx.workdir / f'point-{p.index:03d}' for p in todo],
                                 resume=ctx.resume, stop_after_epochs=ctx.stop_after_epochs,
                                 partitioner=ctx.partitioner,
                                 labels=[f'point {p.index + 1}' for p in todo])
    seconds = time.perf_counter() - start
    for point, outcome in zip(todo, outcomes):
        if outcome.get('diverged'):
            ctx.log(f'point {point.index + 1} diverged: {outcome["diverged"]}')
        results[point.index] = _close_point(point, outcome, seconds, ctx)
    return results


def _summarise(cfg, results, popularity, data_summary: dict) -> dict:
    metric = cfg.eval.valid_metric.lower()
    scored = [r for r in results if r.get('best_valid')]
    best = max(scored, key=lambda r: r['best_valid'][metric]) if scored else None
    return {'dataset': cfg.data.dataset, 'model': cfg.model_name,
            'hyper_parameters': list(cfg.hyper_parameters), 'valid_metric': metric,
            'points': [{k: v for k, v in r.items() if k != 'history'} for r in results],
            'best_point': None if best is None else best['index'],
            'popularity': popularity, 'data': data_summary,
            'finished': all(r['finished'] for r in results)}


def _print_summary(cfg, summary) -> None:
    metric = summary['valid_metric']
    metrics, ks = [m.lower() for m in cfg.eval.metrics], list(cfg.eval.topk)
    scored = [p for p in summary['points'] if p.get('best_valid')]
    if len(summary['points']) > 1 and scored:
        reporting.log('\nGrid (each point at its best valid epoch):')
        reporting.log(reporting.grid_table(scored, list(summary['hyper_parameters']), metric))
    if summary['best_point'] is None:
        reporting.log('no point produced a validation result')
        return
    best = next(p for p in summary['points'] if p['index'] == summary['best_point'])
    label = ', '.join(f'{k}={v}' for k, v in best['values'].items())
    reporting.log(f'\nBest point by valid {metric}: {label} (epoch {best["best_epoch"]})')
    rows = [(f'{cfg.model_name} valid', best['best_valid']),
            (f'{cfg.model_name} test', best['best_test']),
            ('most-popular valid', summary['popularity']['valid']),
            ('most-popular test', summary['popularity']['test'])]
    reporting.log(reporting.metrics_table(rows, metrics, ks))
    if not summary['finished']:
        reporting.log('\nrun interrupted before every point finished: resume with '
                      '--config.resume=True')
