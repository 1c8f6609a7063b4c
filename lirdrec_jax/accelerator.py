"""The first run on a GPU or TPU: every model at MMRec scales, one JSON and one Markdown table.

  python -m lirdrec_jax.accelerator --out results/a100
  python -m lirdrec_jax.accelerator --out results/a100 --references /src   # also the references
  python -m lirdrec_jax.accelerator --out /tmp/acc --scales tiny --models lirdrec,freedom

Prints the devices (platform, kind, memory, jax/jaxlib versions), estimates the total time,
then benchmarks every model x scale x dtype through `lirdrec_jax.bench` in this process
(synthetic data generated once per scale; each model's prepared data shared by its dtypes), a
vmapped sweep of each model's Baby grid group against its points one by one, and, where a
CUDA torch is present and --references holds the checkouts (DIR/LIRDRec, DIR/FREEDOM, ...,
named as the reference repositories), the PyTorch reference on the same data (float32 cells).
After every cell DIR/accelerator.json (everything) and DIR/accelerator.md (the table) are
rewritten atomically, so a run that is killed keeps what finished. A cell that fails (device
out of memory, a config error) is recorded with its reason and the run goes on.

Defaults (docs/devices.md says how they were chosen): scales baby, clothing, elec; float32 and
bfloat16; 2 epochs; every batch of an epoch timed except at Elec and MicroLens (the first
`SCALE_BATCHES` batches, the epoch extrapolated); one evaluation after the first (which
compiles); a sweep of 2 points of each grid group at Baby scale.
"""
import argparse
import datetime
import gc
import importlib.metadata
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional

import jax

from lirdrec_jax import bench, cli, grid, models, sweep, train
from lirdrec_jax.models import base

DEFAULT_SCALES = ('baby', 'clothing', 'elec')
DTYPES = ('float32', 'bfloat16')
# Batches timed per epoch where a whole epoch is long (0 = all): Elec has 611 batches of 2048.
SCALE_BATCHES = {'elec': 20, 'microlens': 20}
DEFAULT_EPOCHS = 2
EVAL_REPEATS = 1  # evaluations timed after the first (which compiles)
DEFAULT_SWEEP_POINTS = 2
DEFAULT_BUDGET_MINUTES = 10.0
JSON_FILE, MARKDOWN_FILE = 'accelerator.json', 'accelerator.md'

# The time estimate (`estimate_seconds`): rough figures for one modern GPU and its host, stated
# so that a reader can redo the sum (docs/devices.md). Device work: analytic FLOPs at
# MATMUL_EFFICIENCY of the GEMM rate measured on the device. Host and compiler work: the rest.
MATMUL_EFFICIENCY = 0.5
COMPILE_SECONDS = 10.0         # per compiled training program with its evaluation and set-up
GENERATE_SECONDS = (5.0, 3e-8, 9e-6)  # + per user-item pair (capped) + per interaction
PREPARE_SECONDS_PER_INTERACTION = 1e-5  # per model and scale: adjacency, samplers, stand-ins


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------

def _names(flag: str, text: str, allowed, everything: Optional[tuple] = None) -> list:
    """A comma-separated list of names from `allowed` ('all': `everything`), else a one-line
    error naming the flag."""
    if everything is not None and text == 'all':
        return list(everything)
    names = [n.strip() for n in text.split(',') if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        what = ', '.join(map(repr, unknown)) or '(empty)'
        raise SystemExit(f'error: {flag} {text!r}: unknown {what}; expected a comma-separated '
                         f'list of {", ".join(sorted(allowed))}'
                         + (' or all' if everything is not None else ''))
    return list(dict.fromkeys(names))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m lirdrec_jax.accelerator',
                                description=__doc__.splitlines()[0])
    p.add_argument('--out', required=True, help='folder for accelerator.json and accelerator.md')
    p.add_argument('--models', default='all', help='comma-separated registered models, or all')
    p.add_argument('--scales', default=','.join(DEFAULT_SCALES),
                   help=f'comma-separated bench scales ({", ".join(sorted(bench.SCALES))})')
    p.add_argument('--dtypes', default=','.join(DTYPES), help="the towers' matmul dtypes")
    p.add_argument('--epochs', type=int, default=DEFAULT_EPOCHS, help='epochs timed per cell')
    p.add_argument('--batches', type=int, default=None,
                   help='batches timed per epoch at every scale (0 = all; default: all, except '
                        + ', '.join(f'{s} {n}' for s, n in SCALE_BATCHES.items()) + ')')
    p.add_argument('--sweep_scale', default='baby',
                   help="scale of the vmapped-vs-sequential sweep over each model's Baby grid "
                        "('none': no sweep)")
    p.add_argument('--sweep_points', type=int, default=DEFAULT_SWEEP_POINTS,
                   help='at most this many points of the grid group in the sweep (>= 2)')
    p.add_argument('--references', metavar='DIR',
                   help='folder of reference checkouts named as their repositories (LIRDRec, '
                        'FREEDOM, CM3, MLLMRec, DGVAE); used where a CUDA torch is present')
    p.add_argument('--budget_minutes', type=float, default=DEFAULT_BUDGET_MINUTES,
                   help='warn before starting when the estimate exceeds this')
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.models = _names('--models', args.models, models.REGISTRY, tuple(models.REGISTRY))
    args.scales = _names('--scales', args.scales, bench.SCALES)
    args.dtypes = _names('--dtypes', args.dtypes, DTYPES)
    if args.sweep_scale != 'none':
        _names('--sweep_scale', args.sweep_scale, tuple(bench.SCALES) + ('none',))
    if args.epochs < 1:
        raise SystemExit(f'error: --epochs {args.epochs}: expected >= 1')
    if args.batches is not None and args.batches < 0:
        raise SystemExit(f'error: --batches {args.batches}: expected >= 0 (0 = every batch)')
    if args.sweep_points < 2:
        raise SystemExit(f'error: --sweep_points {args.sweep_points}: expected >= 2')
    return args


def writable_out(path: str) -> Path:
    """--out created if needed and proven writable, else a one-line error."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix='.write_test_'):
            pass
    except OSError as err:
        raise SystemExit(f'error: --out {path}: cannot write there ({err.strerror or err}); '
                         'expected a writable folder') from None
    return out


def batches_for(scale: str, batches: Optional[int]) -> int:
    """Batches timed per epoch at `scale`: --batches when given, else SCALE_BATCHES (0 = all)."""
    return SCALE_BATCHES.get(scale, 0) if batches is None else batches


# ----------------------------------------------------------------------------------------------
# Devices and references
# ----------------------------------------------------------------------------------------------

def device_report() -> dict:
    """The devices JAX sees: platform, kind, memory where `memory_stats` reports it, versions."""
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    devices = []
    for d in jax.devices():
        stats = d.memory_stats() if hasattr(d, 'memory_stats') else None
        devices.append({'id': d.id, 'platform': d.platform, 'kind': d.device_kind,
                        'memory_bytes': (stats or {}).get('bytes_limit')})
    return {'platform': jax.default_backend(), 'devices': devices, 'jax': jax.__version__,
            'jaxlib': version('jaxlib'), 'process_count': jax.process_count()}


def format_devices(report: dict) -> List[str]:
    kind = {'tpu': 'a TPU', 'gpu': 'a GPU', 'cpu': 'the CPU (no accelerator visible)'}
    lines = [f'runs on {kind.get(report["platform"], report["platform"])}: '
             f'{len(report["devices"])} device(s); jax {report["jax"]}, '
             f'jaxlib {report["jaxlib"]}']
    for d in report['devices']:
        memory = ('memory not reported' if d['memory_bytes'] is None
                  else f'{d["memory_bytes"] / 2 ** 30:.1f} GiB')
        lines.append(f'  device {d["id"]}: {d["platform"]}, {d["kind"]}, {memory}')
    return lines


def reference_checkouts(model_names, references: Optional[str]) -> dict:
    """{'checkouts': {model: path}, 'skipped': why not (or None)}: the references run where a
    CUDA torch is present and `references` holds a model's checkout (named as its repository,
    e.g. DIR/LIRDRec)."""
    if not references:
        return {'checkouts': {}, 'skipped': 'no --references folder given'}
    try:
        import torch
    except ImportError:
        return {'checkouts': {}, 'skipped': 'torch is not installed'}
    if not torch.cuda.is_available():
        return {'checkouts': {}, 'skipped': f'torch {torch.__version__} has no CUDA device '
                                            '(torch.cuda.is_available() is False)'}
    checkouts, missing = {}, []
    for name in model_names:
        hooks = models.get_model(name).parity
        folder = Path(references) / hooks.reference_repo.split('/')[-1] if hooks else None
        if folder is not None and folder.is_dir():
            checkouts[name] = str(folder)
        else:
            missing.append(str(folder) if folder else f'{name} (no parity module)')
    return {'checkouts': checkouts,
            'skipped': f'no checkout at {", ".join(missing)}' if missing else None}


# ----------------------------------------------------------------------------------------------
# The time estimate
# ----------------------------------------------------------------------------------------------

def problem_size(scale: str, batch_size: int) -> base.ProblemSize:
    """The sizes of `scale` for the analytic FLOP count (about 74% of interactions train)."""
    n_users, n_items, n_inter = bench.SCALES[scale]
    return base.ProblemSize(n_users, n_items, int(0.74 * n_inter), batch_size,
                            (bench.IMAGE_DIM, bench.TEXT_DIM))


def n_batches(model: base.Model, size: base.ProblemSize) -> int:
    rows = size.n_train if model.batch_kind == 'bpr' else size.n_users
    return max(1, math.ceil(rows / size.batch_size))


def estimate_seconds(args, gemm_flops: float, n_devices: int = 1) -> dict:
    """A rough total time: per scale the data generation; per model and scale its preparation;
    per cell COMPILE_SECONDS plus its timed batches and evaluations at MATMUL_EFFICIENCY of
    `gemm_flops` per device; per sweep one compilation per program plus two epochs each."""
    rate = gemm_flops * n_devices * MATMUL_EFFICIENCY
    a, per_pair, per_inter = GENERATE_SECONDS
    cells, parts = {}, {'generate': 0.0, 'prepare': 0.0, 'cells': 0.0, 'sweep': 0.0}
    for scale in args.scales:
        n_users, n_items, n_inter = bench.SCALES[scale]
        parts['generate'] += a + per_pair * min(n_users * n_items, bench.CANDIDATE_PAIRS) \
            + per_inter * n_inter
        for name in args.models:
            model = models.get_model(name)
            cfg = grid.expand_grid(cli.load_config(name))[0].config
            size = problem_size(scale, int(cfg.train.batch_size))
            parts['prepare'] += PREPARE_SECONDS_PER_INTERACTION * n_inter
            timed = bench.timed_batches(n_batches(model, size), batches_for(scale, args.batches))
            train_flops = args.epochs * timed * model.flops_per_batch(cfg.model, size)
            eval_flops = (EVAL_REPEATS + 1) * 2 * n_users * n_items * 2 * 64
            for dtype in args.dtypes:
                cells[f'{name} {scale} {dtype}'] = (COMPILE_SECONDS
                                                    + (train_flops + eval_flops) / rate)
    parts['cells'] = sum(cells.values())
    if args.sweep_scale != 'none':
        for name in args.models:
            model = models.get_model(name)
            points = sweep_configs(name, args.sweep_points)
            if len(points) < 2:
                continue
            size = problem_size(args.sweep_scale, int(points[0].train.batch_size))
            epoch = n_batches(model, size) * model.flops_per_batch(points[0].model, size) / rate
            # vmapped: one program, 2 epochs of all points; sequential: one program per point
            parts['sweep'] += (len(points) + 1) * COMPILE_SECONDS + 2 * 2 * len(points) * epoch
    return {'total_seconds': sum(parts.values()), 'parts': parts, 'cells': cells,
            'gemm_gflops': gemm_flops / 1e9, 'assumptions': {
                'matmul_efficiency': MATMUL_EFFICIENCY, 'compile_seconds': COMPILE_SECONDS,
                'generate_seconds': list(GENERATE_SECONDS),
                'prepare_seconds_per_interaction': PREPARE_SECONDS_PER_INTERACTION}}


# ----------------------------------------------------------------------------------------------
# Cells
# ----------------------------------------------------------------------------------------------

def failure_reason(err: BaseException) -> str:
    """One line saying why a cell failed; a device out of memory (XLA's RESOURCE_EXHAUSTED)
    says so first."""
    text = str(err).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), '')
    first = first if len(first) <= 240 else first[:237] + '...'
    if 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower():
        return f'device out of memory: {first}'
    if isinstance(err, SystemExit):
        return first or f'exited with status {err.code}'
    return f'{type(err).__name__}: {first}'


def cell_argv(model: str, scale: str, dtype: str, args, reference: Optional[str]) -> list:
    """The bench command line of one cell."""
    argv = ['--config', model, '--scale', scale, '--matmul_dtype', dtype,
            '--epochs', str(args.epochs), '--batches', str(batches_for(scale, args.batches)),
            '--eval_repeats', str(EVAL_REPEATS)]
    return argv + (['--reference', reference] if reference else [])


def run_cell(model: str, scale: str, dtype: str, args, reference: Optional[str],
             reuse: dict) -> dict:
    """One benchmark cell (`bench.run_benchmark` in this process): its result, or the one-line
    reason it failed; the wall seconds either way."""
    cell = {'model': model, 'scale': scale, 'dtype': dtype,
            'argv': cell_argv(model, scale, dtype, args, reference)}
    start = time.perf_counter()
    try:
        cell['result'] = bench.run_benchmark(bench.parse_args(cell['argv']), reuse=reuse)
        cell['status'] = 'ok'
    except (Exception, SystemExit) as err:  # the run goes on with the next cell
        cell.update(status='failed', reason=failure_reason(err))
    finally:
        jax.clear_caches()  # compiled programs and their buffers of this cell
        gc.collect()
    cell['wall_seconds'] = time.perf_counter() - start
    return cell


def cell_row(cell: dict, high_water: Optional[int] = None) -> dict:
    """The table's values of a cell (None where not measured); `high_water`: the largest
    device peak of the earlier cells. `memory_stats` reports the process's peak since start,
    so a cell whose peak is not above `high_water` only shows that its own is at most that."""
    r = cell.get('result') or {}
    peak = r.get('device_peak_bytes')
    ref = r.get('reference') or {}
    ref_epochs = ref.get('epoch_seconds') or []
    ours = r.get('epoch_min_seconds')
    return {
        'model': cell['model'], 'scale': cell['scale'], 'dtype': cell['dtype'],
        'epoch_seconds': ours, 'epoch_extrapolated': bool(r.get('epoch_extrapolated')),
        'batch_ms': None if r.get('batch_seconds') is None else 1000 * r['batch_seconds'],
        'eval_seconds': r.get('eval_seconds'),
        'device_peak_gib': None if peak is None else peak / 2 ** 30,
        'device_peak_at_most': peak is not None and high_water is not None and peak <= high_water,
        'epoch_over_floor': r.get('epoch_over_floor'),
        'reference_ratio': (min(ref_epochs) / ours if ref_epochs and ours and not ref.get('failed')
                            else None),
        'note': (cell.get('reason') or ref.get('failed') or ''),
    }


def table_rows(cells: List[dict]) -> List[dict]:
    rows, high_water = [], None
    for cell in cells:
        rows.append(cell_row(cell, high_water))
        peak = (cell.get('result') or {}).get('device_peak_bytes')
        if peak is not None:
            high_water = max(high_water or 0, peak)
    return rows


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------

def sweep_configs(model: str, max_points: int) -> list:
    """The largest group of `model`'s Baby grid whose points share one compiled program
    (`sweep.group_points`), at most `max_points` of it, each set to train 2 epochs without
    evaluation, checkpoints kept small, no TensorBoard files."""
    points = grid.expand_grid(cli.load_config(f'{model}:baby'))
    group = max(sweep.group_points(points), key=len)[:max_points]
    cfgs = []
    for point in group:
        c = point.config.copy_and_resolve_references()
        c.train.epochs = 2
        c.train.eval_step = 1000  # training only
        c.checkpoint.keep_last = 1
        c.checkpoint.tensorboard = False
        cfgs.append(c)
    return cfgs


def time_sweep(model: str, scale: str, max_points: int, reuse: dict) -> dict:
    """One epoch of a grid group vmapped (`train.train_points` of the group) against the same
    points trained one by one (one `train_points` each); the second epoch of each is timed
    (the first compiles). Speed-up: the points' epochs added up / the vmapped epoch."""
    cfgs = sweep_configs(model, max_points)
    out = {'model': model, 'scale': scale, 'points': len(cfgs)}
    if len(cfgs) < 2:
        out['skipped'] = f"the {model}:baby grid has no two points that share a program"
        return out
    phases = bench.Phases()
    dataset = bench.scale_dataset(scale, model, phases, reuse)
    prepared = bench.reused_or_made(reuse, ('prepare', scale, model), phases, 'prepare',
                                    lambda: train.prepare_data(dataset, model))
    partitioner = train.create_partitioner(cfgs[0].parallel)

    def epoch_of(result: dict) -> float:
        if result.get('diverged'):
            raise FloatingPointError(f'a sweep point diverged: {result["diverged"]}')
        return result['history'][-1]['train_seconds']  # the second epoch's

    with tempfile.TemporaryDirectory(prefix='lirdrec_accelerator_sweep_') as tmp:
        start = time.perf_counter()
        grouped = train.train_points(cfgs, prepared, [Path(tmp) / f'v{i}' for i in
                                                      range(len(cfgs))],
                                     partitioner=partitioner,
                                     labels=[f'{model} vmapped {i}' for i in range(len(cfgs))])
        out['vmapped_wall_seconds'] = time.perf_counter() - start
        start, sequential = time.perf_counter(), []
        for i, c in enumerate(cfgs):
            alone = train.train_points([c], prepared, [Path(tmp) / f's{i}'],
                                       partitioner=partitioner, labels=[f'{model} alone {i}'])
            sequential.append(epoch_of(alone[0]))
        out['sequential_wall_seconds'] = time.perf_counter() - start
    out.update(vmapped_epoch_seconds=epoch_of(grouped[0]), sequential_epoch_seconds=sequential,
               sequential_total_seconds=sum(sequential),
               speedup=sum(sequential) / epoch_of(grouped[0]))
    return out


def run_sweep(model: str, scale: str, max_points: int, reuse: dict) -> dict:
    """`time_sweep`, or the one-line reason it failed."""
    try:
        return time_sweep(model, scale, max_points, reuse)
    except (Exception, SystemExit) as err:
        return {'model': model, 'scale': scale, 'failed': failure_reason(err)}
    finally:
        jax.clear_caches()
        gc.collect()


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _num(value, digits: int, mark: str = '') -> str:
    return '—' if value is None else f'{value:.{digits}f}{mark}'


TABLE_HEADER = ('model', 'scale', 'dtype', 'epoch s', 'batch ms', 'eval s', 'device peak GiB',
                'epoch/floor', 'reference ratio', 'note')


def format_markdown(record: dict) -> str:
    """accelerator.md: devices, the cells' table, the sweeps, the references."""
    lines = ['# Accelerator run', '', *(f'    {line}' for line in
                                        format_devices(record['devices'])), '',
             f'Started {record["started"]}; {record["elapsed_seconds"]:.0f} s so far '
             f'(estimate {record["estimate"]["total_seconds"]:.0f} s); '
             + ('finished.' if record['finished'] else
                f'{len(record["cells"])} of {record["n_cells"]} cells done.'), '',
             '| ' + ' | '.join(TABLE_HEADER) + ' |',
             '|' + '|'.join('---' for _ in TABLE_HEADER) + '|']
    for row in table_rows(record['cells']):
        lines.append('| ' + ' | '.join([
            row['model'], row['scale'], row['dtype'],
            _num(row['epoch_seconds'], 3, '*' if row['epoch_extrapolated'] else ''),
            _num(row['batch_ms'], 2), _num(row['eval_seconds'], 3),
            ('≤ ' if row['device_peak_at_most'] else '') + _num(row['device_peak_gib'], 2),
            _num(row['epoch_over_floor'], 2), _num(row['reference_ratio'], 2),
            row['note'].replace('|', '/')]) + ' |')
    lines += ['', '\\* extrapolated from the first batches of each epoch (n_batches / timed x '
              'measured). ≤: the process\'s device peak did not rise in this cell, so its own '
              'peak is at most that. Reference ratio: reference epoch / ours (float32).']
    if record['sweeps']:
        lines += ['', '| sweep model | scale | points | vmapped epoch s | sequential epochs s '
                  '| speed-up | note |', '|---|---|---|---|---|---|---|']
        for s in record['sweeps']:
            lines.append(f'| {s["model"]} | {s["scale"]} | {s.get("points", "—")} | '
                         f'{_num(s.get("vmapped_epoch_seconds"), 3)} | '
                         f'{_num(s.get("sequential_total_seconds"), 3)} | '
                         f'{_num(s.get("speedup"), 2)} | '
                         f'{s.get("skipped") or s.get("failed") or ""} |')
    ref = record['references']
    lines += ['', 'References: ' + (f'skipped: {ref["skipped"]}' if not ref['checkouts'] else
                                    f'run for {", ".join(sorted(ref["checkouts"]))}'
                                    + (f'; skipped: {ref["skipped"]}' if ref['skipped'] else ''))]
    return '\n'.join(lines) + '\n'


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(text, encoding='utf-8')
    tmp.replace(path)


def write_outputs(out: Path, record: dict) -> None:
    """accelerator.json and accelerator.md of `record` as it stands (atomic writes)."""
    import json
    _write_atomic(out / JSON_FILE, json.dumps(record, indent=2, sort_keys=True, default=str))
    _write_atomic(out / MARKDOWN_FILE, format_markdown(record))


def _log(message: str) -> None:
    print(message, flush=True)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def plan_cells(args) -> List[tuple]:
    """(model, scale, dtype) in run order: scale by scale, so that its data is made once."""
    return [(m, s, d) for s in args.scales for m in args.models for d in args.dtypes]


def run(args, log: Callable[[str], None] = _log) -> dict:
    """Everything of the command; returns the record written to accelerator.json."""
    out = writable_out(args.out)
    devices = device_report()
    for line in format_devices(devices):
        log(line)
    references = reference_checkouts(args.models, args.references)
    if references['skipped']:
        log(f'references: skipped ({references["skipped"]})')
    estimate = estimate_seconds(args, bench.gemm_rate('float32'), len(jax.devices()))
    log(f'estimated total: about {estimate["total_seconds"] / 60:.1f} min ('
        + ', '.join(f'{k} {v:.0f} s' for k, v in estimate['parts'].items()) + ')')
    if estimate['total_seconds'] > 60 * args.budget_minutes:
        log(f'warning: the estimate exceeds --budget_minutes {args.budget_minutes:g}; fewer '
            '--scales, --models or --dtypes, or smaller --batches, make it shorter')
    cells = plan_cells(args)
    record = {'command': ['python', '-m', 'lirdrec_jax.accelerator'] + args.argv,
              'started': datetime.datetime.now().isoformat(timespec='seconds'),
              'devices': devices, 'estimate': estimate, 'references': references,
              'settings': {'epochs': args.epochs, 'eval_repeats': EVAL_REPEATS,
                           'batches': {s: batches_for(s, args.batches) for s in args.scales},
                           'sweep_scale': args.sweep_scale, 'sweep_points': args.sweep_points},
              'n_cells': len(cells), 'cells': [], 'sweeps': [], 'finished': False,
              'elapsed_seconds': 0.0}
    start, done_estimate = time.perf_counter(), 0.0
    write_outputs(out, record)
    sweep_scale = args.sweep_scale if args.sweep_scale != 'none' else None
    reuse, reuse_scale = {}, None
    for i, (model, scale, dtype) in enumerate(cells):
        if scale != reuse_scale:
            if reuse_scale is not None and reuse_scale == sweep_scale:
                _sweeps(args, record, out, reuse, start, log)
            reuse, reuse_scale = {}, scale  # the previous scale's data is freed
            gc.collect()
        reference = references['checkouts'].get(model) if dtype == 'float32' else None
        cell = run_cell(model, scale, dtype, args, reference, reuse)
        record['cells'].append(cell)
        record['elapsed_seconds'] = elapsed = time.perf_counter() - start
        write_outputs(out, record)
        done_estimate += estimate['cells'][f'{model} {scale} {dtype}']
        log(_progress_line(i + 1, len(cells), cell, elapsed,
                           _remaining(estimate, done_estimate, elapsed)))
    if sweep_scale is not None:
        if reuse_scale != sweep_scale:
            reuse = {}
        _sweeps(args, record, out, reuse, start, log)
    del reuse
    record['finished'] = True
    record['elapsed_seconds'] = time.perf_counter() - start
    write_outputs(out, record)
    log('')
    log(format_markdown(record))
    log(f'written: {out / JSON_FILE}, {out / MARKDOWN_FILE}')
    return record


def _sweeps(args, record: dict, out: Path, reuse: dict, start: float, log) -> None:
    for model in args.models:
        s = run_sweep(model, args.sweep_scale, args.sweep_points, reuse)
        record['sweeps'].append(s)
        record['elapsed_seconds'] = time.perf_counter() - start
        write_outputs(out, record)
        log(f'sweep {model} at {args.sweep_scale}: ' + (
            s.get('skipped') or s.get('failed') or
            f'{s["points"]} points, vmapped epoch {s["vmapped_epoch_seconds"]:.3f} s, one by '
            f'one {s["sequential_total_seconds"]:.3f} s: {s["speedup"]:.2f}x'))


def _remaining(estimate: dict, done_cells: float, elapsed: float) -> float:
    """What is left of the estimate, scaled by how long the finished part took against its
    estimate (`done_cells`: the estimate of the finished cells; data making is counted in
    proportion)."""
    parts = estimate['parts']
    if not parts['cells'] or not done_cells:
        return estimate['total_seconds']
    done = done_cells / parts['cells'] * (parts['generate'] + parts['prepare'] + parts['cells'])
    return max(0.0, estimate['total_seconds'] - done) * elapsed / done


def _progress_line(i: int, n: int, cell: dict, elapsed: float, remaining: float) -> str:
    what = f'[{i}/{n}] {cell["model"]} {cell["scale"]} {cell["dtype"]}: '
    if cell['status'] != 'ok':
        what += f'failed: {cell["reason"]}'
    else:
        row = cell_row(cell)
        what += (f'epoch {row["epoch_seconds"]:.3f} s'
                 + (' (extrapolated)' if row['epoch_extrapolated'] else '')
                 + f', batch {row["batch_ms"]:.2f} ms, eval {row["eval_seconds"]:.3f} s')
    return what + (f'  ({cell["wall_seconds"]:.0f} s; {elapsed:.0f} s elapsed, about '
                   f'{remaining:.0f} s to go)')


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == '__main__':
    main()
