"""Memory plans and the cost model: what every model needs of a GPU or TPU at every dataset
scale, from XLA's own analyses of the programs the trainer compiles.

  python -m lirdrec_jax.plans [--models all|lirdrec,freedom] [--scales embedded,baby,...]
                              [--dtypes float32,bfloat16] [--devices 1,8]
                              [--train_step] [--json OUT] [--markdown OUT]

For every model x scale x dtype (`model.matmul_dtype`) x device count (items split over the
devices), the programs of the model's first grid point are built for GPU/TPU exactly as the
trainer builds them (`lowering.programs`: the CPU-only options off), compiled on this machine,
and measured with `lowering.compiled_stats`. Scales: 'embedded' is the embedded default
dataset itself; the others are `bench.SCALES`' synthetic data with the exact counts of MMRec's
datasets and 4096-d image + 384-d text features (the arrays' shapes are what matter here).

What the numbers are (per device, bytes):
  resident: what stays on a device for the whole run: the training state (parameters, Adam's
    moments, the carry), the frozen inputs and the epoch inputs, as placed (a split array counts
    its shard), from the arrays' own sizes.
  extra(P) of a program P: what P adds while it runs: its arguments that are not resident
    (batches, scalars, a block of users, the ranked embeddings), its outputs and temporaries
    (`memory_analysis`), minus the outputs written into donated arguments (alias: the new state
    reuses the old one's buffers).
  training = resident + max extra over train_epoch (an epoch's batches in one `lax.scan`:
    how a run trains by default) and start_epoch, and train_step (the per-batch step of
    train.scan_epoch=False) where it is compiled: in the cost model's cells, or in every cell
    with --train_step (compiling it doubles the time of a cell).
  evaluation = resident + max extra over eval_embeddings, eval_item_order and eval_topk (the
    ranking of one block of eval.batch_size users per device, whose inputs include the float32
    embeddings every device holds while ranking).
  need = max(training, evaluation).
A device fits a cell when need <= (1 - HEADROOM) x its memory: 10% is left for the runtime
(CUDA context and allocator fragmentation, XLA's own workspace), which XLA's analysis does not
see. The analysis is XLA:CPU's buffer assignment of the same programs; GPU and TPU compilers
fuse differently, so their temporaries differ somewhat (the headroom covers part of that).

A cell that does not fit gets advice from measured cells only: the same model and scale in
bfloat16, with the items split over more devices, both, or (measured for such cells only) with
eval.batch_size and train.batch_size divided by SMALLER_BATCH.

More devices than JAX sees: on the CPU the command runs again in a child process with
XLA_FLAGS=--xla_force_host_platform_device_count=N (simulated devices) and the whole matrix is
measured there, so that every dataset and kNN graph is built once (a one-device cell uses the
first of them). kNN neighbour searches over equal features (every model's graph over the same
image and text tables, float32 and bfloat16 points) are computed once (`graph.reusing_knn_searches`).

The cost model (every model at 'baby' and 'elec' with float32 on one device, when measured):
XLA's FLOPs and bytes accessed of one train_step next to the model's analytic
`flops_per_batch`, their ratio, and the epoch time the analytic count implies on each device
(roofline: n_batches x max(flops / peak, bytes / bandwidth), `DEVICES`).
"""
import argparse
import datetime
import gc
import json
import os
import platform as platform_lib
import subprocess
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

import jax
import numpy as np

from lirdrec_jax import bench, graph, grid, lowering, models, train

HEADROOM = 0.10  # of a device's memory, left for the runtime
SMALLER_BATCH = 4  # the batch-size advice measures eval/train.batch_size // SMALLER_BATCH
SCALE_NAMES = ('embedded', 'baby', 'sports', 'clothing', 'microlens', 'elec')
DTYPES = ('float32', 'bfloat16')
COST_SCALES = ('baby', 'elec')
# The programs of each phase (`lowering.programs`' names).
TRAINING_PROGRAMS = ('train_epoch', 'start_epoch', 'train_step')
EVALUATION_PROGRAMS = ('eval_embeddings', 'eval_item_order', 'eval_topk')
CHILD_ENV = 'LIRDREC_JAX_PLANS_CHILD'  # set in the child process (no second re-run)
GiB, GB, TERA = 2 ** 30, 10 ** 9, 10 ** 12


class Device(NamedTuple):
    """One accelerator (per device as JAX sees it: a TPU v2 core, a v5e chip, one GPU).

    Attributes:
      memory: bytes of device memory.
      float32, bfloat16: dense peak FLOP/s of a float32 and of a bfloat16 matmul at JAX's
        default precision (`docs/performance.md`, Cost model, on what that means per device).
      bandwidth: memory bandwidth, bytes/s.
    """
    name: str
    memory: int
    float32: float
    bfloat16: float
    bandwidth: float


DEVICES = (
    # Colab's TPU v2-8: 8 cores of 8 GiB HBM each (cloud.google.com/tpu/docs/v2: 16 GiB per
    # 2-core chip); 45 TFLOP/s bf16 and 600 GB/s per chip, halved per core. float32 matmuls run
    # as one bf16 pass at JAX's default precision.
    Device('TPU v2 core', 8 * GiB, 22.5 * TERA, 22.5 * TERA, 300 * GB),
    # cloud.google.com/tpu/docs/v5e: 16 GiB HBM2, 197 TFLOP/s bf16, 819 GB/s per chip.
    Device('TPU v5e chip', 16 * GiB, 197 * TERA, 197 * TERA, 819 * GB),
    # NVIDIA T4 datasheet: 16 GB GDDR6 (about 15 GiB usable), 8.1 TFLOP/s fp32, 65 fp16,
    # 320 GB/s; no bfloat16 tensor cores: bfloat16 runs at about the fp32 rate.
    Device('T4', 15 * GiB, 8.1 * TERA, 8.1 * TERA, 320 * GB),
    # NVIDIA A100 datasheet: 40 GB HBM2 (1,555 GB/s) or 80 GB HBM2e (2,039 GB/s); 19.5
    # TFLOP/s fp32, 156 TF32 (float32 matmuls may use TF32 at JAX's default precision), 312 bf16.
    Device('A100 40GB', 40 * GB, 19.5 * TERA, 312 * TERA, 1555 * GB),
    Device('A100 80GB', 80 * GB, 19.5 * TERA, 312 * TERA, 2039 * GB),
)


# ----------------------------------------------------------------------------------------------
# Sizes of arrays and programs
# ----------------------------------------------------------------------------------------------

def device_bytes(x) -> int:
    """Bytes of one device's part of an array or ShapeDtypeStruct (its shard when split)."""
    shape = tuple(np.shape(x))
    sharding = getattr(x, 'sharding', None)
    if sharding is not None:
        shape = tuple(sharding.shard_shape(shape))
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def tree_device_bytes(tree, skip_ids=frozenset()) -> int:
    """Per-device bytes of the distinct array leaves of `tree` (a leaf given twice counts
    once), leaving out the leaves whose id is in `skip_ids`."""
    seen, total = set(skip_ids), 0
    for leaf in jax.tree.leaves(tree):
        if id(leaf) not in seen and hasattr(leaf, 'dtype'):
            seen.add(id(leaf))
            total += device_bytes(leaf)
    return total


def resident_leaves(progs: Dict[str, lowering.Program]) -> list:
    """The leaves a run keeps on the devices throughout: the state, the frozen inputs and the
    epoch inputs (arguments 0, 2 and 3 of `train_step`)."""
    args = progs['train_step'].args
    return jax.tree.leaves((args[0], args[2], args[3]))


def program_extra(stats: dict, program: lowering.Program, resident_ids) -> int:
    """What `program` adds to the resident bytes while it runs: its non-resident arguments,
    outputs and temporaries, minus the outputs aliased to donated arguments."""
    return (tree_device_bytes(program.args, resident_ids) + stats['output_bytes']
            + stats['temp_bytes'] - stats['alias_bytes'])


def memory_plan(progs: Dict[str, lowering.Program], stats: Dict[str, dict]) -> dict:
    """{'resident', 'training', 'evaluation', 'need', 'extra': {program: bytes}} per device
    (module docstring) from the programs and their `compiled_stats`."""
    leaves = resident_leaves(progs)
    ids = frozenset(id(x) for x in leaves)
    resident = tree_device_bytes(leaves)
    extra = {name: program_extra(stats[name], progs[name], ids) for name in stats}
    training = resident + max(extra[n] for n in TRAINING_PROGRAMS if n in extra)
    evaluation = resident + max(extra[n] for n in EVALUATION_PROGRAMS if n in extra)
    return {'resident': resident, 'training': training, 'evaluation': evaluation,
            'need': max(training, evaluation), 'extra': extra}


# ----------------------------------------------------------------------------------------------
# Verdicts and advice
# ----------------------------------------------------------------------------------------------

def fits(need: int, memory: int, headroom: float = HEADROOM) -> bool:
    """Whether `need` bytes fit a device of `memory` bytes with `headroom` left free."""
    return need <= (1.0 - headroom) * memory


def cell_key(cell: dict) -> tuple:
    return (cell['model'], cell['scale'], cell['dtype'], cell['devices'],
            cell.get('variant', ''))


def advice(cell: dict, cells: Sequence[dict], memory: int) -> List[str]:
    """What makes `cell` fit a device of `memory` bytes, from the measured `cells` of the same
    model and scale: bfloat16 (same devices), the items split over more devices (same dtype),
    both, or a smaller batch (a variant measured for this cell). [] when it fits or nothing
    measured does."""
    if fits(cell['need'], memory):
        return []
    same = [c for c in cells if (c['model'], c['scale']) == (cell['model'], cell['scale'])]
    out = []

    def option(label, match):
        found = [c for c in same if match(c) and fits(c['need'], memory)]
        if found:
            out.append(label(min(found, key=lambda c: (c['devices'], c['need']))))

    base_cell = lambda c: not c.get('variant')
    if cell['dtype'] != 'bfloat16':
        option(lambda c: 'bfloat16', lambda c: base_cell(c) and c['dtype'] == 'bfloat16'
               and c['devices'] == cell['devices'])
    option(lambda c: f'items split over {c["devices"]} devices',
           lambda c: base_cell(c) and c['dtype'] == cell['dtype']
           and c['devices'] > cell['devices'])
    if cell['dtype'] != 'bfloat16' and not out:
        option(lambda c: f'bfloat16 + items split over {c["devices"]} devices',
               lambda c: base_cell(c) and c['dtype'] == 'bfloat16'
               and c['devices'] > cell['devices'])
    option(lambda c: c['variant'],
           lambda c: c.get('variant') and (c['dtype'], c['devices'])
           == (cell['dtype'], cell['devices']))
    return out


def verdicts(cell: dict, cells: Sequence[dict], devices: Sequence[Device] = DEVICES) -> dict:
    """{device name: {'fits': bool, 'advice': [str]}} of one measured cell."""
    return {d.name: {'fits': fits(cell['need'], d.memory),
                     'advice': advice(cell, cells, d.memory)} for d in devices}


# ----------------------------------------------------------------------------------------------
# The cost model
# ----------------------------------------------------------------------------------------------

def roofline_seconds(flops: float, bytes_accessed: float, peak: float,
                     bandwidth: float) -> float:
    """The time of a step that does `flops` and moves `bytes_accessed` on a device with this
    peak FLOP/s and bandwidth: max(compute time, memory time)."""
    return max(flops / peak, bytes_accessed / bandwidth)


def cost_row(cell: dict, bf16_cell: Optional[dict] = None,
             devices: Sequence[Device] = DEVICES) -> dict:
    """The cost model of one float32 one-device cell: XLA's and the analytic FLOPs per step,
    their ratio, and the roofline epoch seconds per device for float32 (this cell's bytes) and
    bfloat16 (the bfloat16 cell's bytes, when measured)."""
    step = cell['stats']['train_step']
    analytic = cell['analytic_flops']
    epoch = {}
    for d in devices:
        times = {'float32': cell['n_batches'] * roofline_seconds(
            analytic, step['bytes_accessed'], d.float32, d.bandwidth)}
        if bf16_cell is not None:
            times['bfloat16'] = bf16_cell['n_batches'] * roofline_seconds(
                analytic, bf16_cell['stats']['train_step']['bytes_accessed'], d.bfloat16,
                d.bandwidth)
        epoch[d.name] = times
    return {'model': cell['model'], 'scale': cell['scale'], 'n_batches': cell['n_batches'],
            'xla_flops': step['flops'], 'xla_bytes': step['bytes_accessed'],
            'analytic_flops': analytic,
            'ratio': step['flops'] / analytic if analytic else None,
            'epoch_seconds': epoch}


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------

def cell_config(cfg, dtype: str, eval_batch: Optional[int] = None,
                train_batch: Optional[int] = None):
    """The first grid point of `cfg` with `model.matmul_dtype = dtype` (None when the model has
    no such field and dtype is not float32) and optionally other batch sizes."""
    point = grid.expand_grid(cfg)[0].config.copy_and_resolve_references()
    if 'matmul_dtype' not in point.model:
        return point if dtype == 'float32' else None
    point.model.matmul_dtype = dtype
    if dtype == 'bfloat16' and 'cpu_dot' in point.model:
        point.model.cpu_dot = 'xla'  # Eigen dots are a config error with bfloat16
    if eval_batch is not None:
        point.eval.batch_size = eval_batch
    if train_batch is not None:
        point.train.batch_size = train_batch
    return point


def measure_cell(point, data: train.PreparedData, n_devices: int, platform: str = 'gpu',
                 train_step: bool = True) -> dict:
    """The memory plan of one point on `n_devices` devices (items split over them), its
    programs built for `platform` and compiled here: {'stats': {program: compiled_stats},
    'resident', 'training', 'evaluation', 'need', 'extra', 'n_batches'}. `train_step`: also
    the per-batch step (a run uses it only with train.scan_epoch=False)."""
    partitioner = train.create_partitioner({'num_devices': n_devices, 'shard_items': True})
    progs = lowering.programs(point, data, partitioner, platform=platform)
    wanted = [n for n in TRAINING_PROGRAMS + EVALUATION_PROGRAMS
              if train_step or n != 'train_step']
    stats = {name: lowering.compiled_stats(progs[name]) for name in wanted if name in progs}
    plan = memory_plan(progs, stats)
    n_batches = int(jax.tree.leaves(progs['train_epoch'].args[1])[0].shape[0])
    del progs
    return {'stats': stats, **plan, 'n_batches': n_batches}


def scale_datasets(scale: str, model_names: Sequence[str]) -> Dict[str, object]:
    """{model: dataset} of one scale, the data generated once: the embedded dataset as every
    model's config loads it, or `bench`'s synthetic data with each model's extra inputs."""
    from lirdrec_jax import cli, experiment, model_inputs, synthetic
    if scale == 'embedded':
        out = {}
        for name in model_names:
            cfg = cli.load_config(name)
            out[name] = experiment.load_dataset(cfg.data, models.get_model(name).input_files)
        return out
    files = {name: models.get_model(name).input_files for name in model_names}
    texts = any(bench.needs_item_texts(f) for f in files.values())
    data = bench.generate(*bench.SCALES[scale], item_text=texts)
    dataset = synthetic.to_dataset(data, scale)
    return {name: model_inputs.with_no_llm_inputs(dataset, files[name], data.item_text)
            for name in model_names}


def log(message: str) -> None:
    from lirdrec_jax import progress
    progress.write(message)


def describe_cell(c: dict) -> str:
    return (f'{c["model"]:8s} {c["scale"]:9s} {c["dtype"]:8s} {c["devices"]} dev'
            + (f' {c["variant"]}' if c.get('variant') else ''))


def run_cells(model_names, scales, dtypes, device_counts, platform: str = 'gpu',
              all_steps: bool = False, on_scale=None) -> List[dict]:
    """Every cell of the matrix (module docstring), printing a line per cell, with the batch
    variants of the cells that fit no device of DEVICES; `on_scale(cells so far)` is called
    after each scale (to save what is measured)."""
    from lirdrec_jax import cli
    cells = []
    configs = {name: cli.load_config(name) for name in model_names}
    with graph.reusing_knn_searches():
        for scale in scales:
            t = time.perf_counter()
            datasets = scale_datasets(scale, model_names)
            log(f'{scale}: data in {time.perf_counter() - t:.0f} s')
            for name in model_names:
                t = time.perf_counter()
                data = train.prepare_data(datasets[name], name)
                log(f'{scale} {name}: prepared in {time.perf_counter() - t:.0f} s')
                for dtype in dtypes:
                    point = cell_config(configs[name], dtype)
                    if point is None:
                        continue
                    for n in device_counts:
                        step = all_steps or (scale in COST_SCALES and n == 1)
                        cells.append(_measured(point, data, name, scale, dtype, n, platform,
                                               train_step=step))
                cells += _batch_variants(cells, configs[name], data, name, scale, platform,
                                         all_steps)
                del data
                gc.collect()
            del datasets
            gc.collect()
            if on_scale is not None:
                on_scale(cells)
    return cells


def _measured(point, data, name, scale, dtype, n, platform, variant='',
              train_step: bool = False) -> dict:
    t = time.perf_counter()
    cell = {'model': name, 'scale': scale, 'dtype': dtype, 'devices': n, 'variant': variant,
            'n_users': data.dataset.n_users, 'n_items': data.dataset.n_items,
            'train_batch_size': int(point.train.batch_size),
            'eval_batch_size': int(point.eval.batch_size),
            **measure_cell(point, data, n, platform, train_step)}
    if 'train_step' in cell['stats'] and n == 1 and not variant:
        flops = models.get_model(name).flops_per_batch
        cell['analytic_flops'] = (float(flops(point.model,
                                              bench.problem_size(point, data.dataset)))
                                  if flops else None)
    cell['seconds'] = time.perf_counter() - t
    log(f'{describe_cell(cell)}: training {cell["training"] / GiB:7.3f} GiB, evaluation '
        f'{cell["evaluation"] / GiB:7.3f} GiB ({cell["seconds"]:.0f} s)')
    return cell


def _batch_variants(cells, cfg, data, name, scale, platform, all_steps) -> List[dict]:
    """For each cell of this model and scale that fits none of DEVICES: the same cell with
    eval.batch_size and with train.batch_size divided by SMALLER_BATCH."""
    out = []
    for c in [c for c in cells if (c['model'], c['scale']) == (name, scale)
              and not c['variant'] and not any(fits(c['need'], d.memory) for d in DEVICES)]:
        for field, value in (('eval', c['eval_batch_size'] // SMALLER_BATCH),
                             ('train', c['train_batch_size'] // SMALLER_BATCH)):
            if value < 1:
                continue
            point = cell_config(cfg, c['dtype'], **{f'{field}_batch': value})
            out.append(_measured(point, data, name, scale, c['dtype'], c['devices'], platform,
                                 variant=f'{field}.batch_size={value}', train_step=all_steps))
    return out


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------

def plan_report(cells: Sequence[dict]) -> dict:
    """The JSON of a run: the cells with their verdicts, the cost model, the devices."""
    for c in cells:
        c['verdicts'] = verdicts(c, cells)
    index = {cell_key(c): c for c in cells}
    costs = []
    for c in cells:
        if (c['scale'] in COST_SCALES and c['dtype'] == 'float32' and c['devices'] == 1
                and not c['variant'] and c.get('analytic_flops')):
            bf16 = index.get((c['model'], c['scale'], 'bfloat16', 1, ''))
            costs.append(cost_row(c, bf16))
    return {'date': datetime.date.today().isoformat(), 'machine': machine(),
            'jax': jax.__version__, 'headroom': HEADROOM,
            'devices': [d._asdict() for d in DEVICES], 'cells': list(cells), 'cost': costs}


def machine() -> str:
    return f'{platform_lib.processor() or platform_lib.machine()}, {os.cpu_count()} cores'


def _gib(x: float) -> str:
    return f'{x / GiB:.3f}'


def _short(name: str) -> str:
    return {'TPU v2 core': 'v2', 'TPU v5e chip': 'v5e', 'T4': 'T4', 'A100 40GB': 'A40',
            'A100 80GB': 'A80'}.get(name, name)


def memory_table(report: dict) -> str:
    """Markdown: one row per cell, per-device GiB and the devices that fit it."""
    names = [d['name'] for d in report['devices']]
    lines = ['| model | scale | dtype | devices | resident GiB | training GiB | evaluation GiB '
             '| fits (of ' + ', '.join(_short(n) for n in names) + ') |',
             '|---|---|---|---|---:|---:|---:|---|']
    for c in report['cells']:
        if c['variant']:
            continue
        ok = [_short(n) for n in names if c['verdicts'][n]['fits']]
        lines.append(f'| {c["model"]} | {c["scale"]} | {c["dtype"]} | {c["devices"]} | '
                     f'{_gib(c["resident"])} | {_gib(c["training"])} | '
                     f'{_gib(c["evaluation"])} | {" ".join(ok) if ok else "none"} |')
    return '\n'.join(lines)


def advice_table(report: dict) -> str:
    """Markdown: the cells that do not fit a device, and what makes them fit."""
    lines = ['| model | scale | dtype | devices | need GiB | device | what fits |',
             '|---|---|---|---|---:|---|---|']
    for c in report['cells']:
        if c['variant']:
            continue
        for name, v in c['verdicts'].items():
            if not v['fits']:
                lines.append(f'| {c["model"]} | {c["scale"]} | {c["dtype"]} | {c["devices"]} | '
                             f'{_gib(c["need"])} | {name} | '
                             f'{"; ".join(v["advice"]) or "nothing measured fits"} |')
    variants = [c for c in report['cells'] if c['variant']]
    for c in variants:
        lines.append(f'| {c["model"]} | {c["scale"]} | {c["dtype"]} | {c["devices"]} | '
                     f'{_gib(c["need"])} | (measured: {c["variant"]}) | '
                     f'training {_gib(c["training"])}, evaluation {_gib(c["evaluation"])} |')
    return '\n'.join(lines) if len(lines) > 2 else 'Every cell fits every device.'


def cost_table(report: dict) -> str:
    """Markdown: the cost model."""
    names = [d['name'] for d in report['devices']]
    lines = ['| model | scale | batches | XLA GFLOP/step | analytic GFLOP/step | XLA / analytic '
             '| XLA GB/step | ' + ' | '.join(f'{n} s/epoch fp32 / bf16' for n in names) + ' |',
             '|---|---|---:|---:|---:|---:|---:|' + '---:|' * len(names)]
    for r in report['cost']:
        cols = []
        for n in names:
            e = r['epoch_seconds'][n]
            cols.append(f'{e["float32"]:.2f}'
                        + (f' / {e["bfloat16"]:.2f}' if 'bfloat16' in e else ''))
        lines.append(f'| {r["model"]} | {r["scale"]} | {r["n_batches"]} | '
                     f'{r["xla_flops"] / 1e9:.2f} | {r["analytic_flops"] / 1e9:.2f} | '
                     f'{r["ratio"]:.3f} | {r["xla_bytes"] / 1e9:.3f} | ' + ' | '.join(cols)
                     + ' |')
    return '\n'.join(lines)


def format_report(report: dict) -> str:
    return '\n\n'.join([f'Memory per device (GiB; fits = need <= {1 - HEADROOM:.0%} of the '
                        'device):', memory_table(report), 'Cells that do not fit:',
                        advice_table(report), 'Cost model (train_step):', cost_table(report)])


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

def parse_list(flag: str, text: str, allowed: Sequence[str]) -> tuple:
    """'a,b' -> ('a', 'b'), each one of `allowed` (one `error:` line naming the flag)."""
    items = tuple(x.strip() for x in text.split(',') if x.strip())
    bad = [x for x in items if x not in allowed]
    if not items or bad:
        raise SystemExit(f'error: {flag} {text!r}: expected a comma-separated list of '
                         f'{", ".join(allowed)}')
    return items


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m lirdrec_jax.plans',
                                description=__doc__.splitlines()[0])
    p.add_argument('--models', default='all', help="'all' or model names, comma-separated")
    p.add_argument('--scales', default=','.join(SCALE_NAMES))
    p.add_argument('--dtypes', default=','.join(DTYPES))
    p.add_argument('--devices', default='1,8', help='device counts, comma-separated')
    p.add_argument('--train_step', action='store_true',
                   help='compile the per-batch train_step in every cell (default: in the cost '
                        "model's cells only)")
    p.add_argument('--json', help='write everything measured to this JSON file')
    p.add_argument('--markdown', help='write the tables to this Markdown file')
    args = p.parse_args(argv)
    names = sorted(models.REGISTRY)
    args.models = names if args.models == 'all' else parse_list('--models', args.models, names)
    args.scales = parse_list('--scales', args.scales, SCALE_NAMES)
    args.dtypes = parse_list('--dtypes', args.dtypes, DTYPES)
    try:
        args.devices = tuple(int(x) for x in args.devices.split(','))
    except ValueError:
        args.devices = ()
    if not args.devices or min(args.devices) < 1:
        raise SystemExit(f'error: --devices {p.parse_args(argv).devices!r}: expected a '
                         'comma-separated list of device counts >= 1')
    return args


def run_in_child(argv: Sequence[str], n_devices: int) -> int:
    """This command again in a child Python process that sees `n_devices` simulated CPU
    devices; its output goes to ours."""
    env = dict(os.environ)
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={n_devices}').strip()
    env[CHILD_ENV] = '1'
    return subprocess.call([sys.executable, '-m', 'lirdrec_jax.plans', *argv], env=env)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    needed = max(args.devices)
    if jax.device_count() < needed:
        if jax.default_backend() != 'cpu' or os.environ.get(CHILD_ENV):
            raise SystemExit(f'error: --devices {max(args.devices)}: this machine has '
                             f'{jax.device_count()} {jax.default_backend()} device(s)')
        log(f'{needed} devices requested, {jax.device_count()} visible: measuring in a child '
            f'process with {needed} simulated CPU devices')
        return run_in_child(argv, needed)
    t = time.perf_counter()

    def save(cells, final=False):
        report = plan_report(cells)
        report['seconds'] = time.perf_counter() - t
        report['complete'] = final
        text = format_report(report)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(report, f, indent=1, sort_keys=True)
        if args.markdown:
            with open(args.markdown, 'w') as f:
                f.write(text + '\n')
        return text

    cells = run_cells(args.models, args.scales, args.dtypes, sorted(args.devices),
                      all_steps=args.train_step, on_scale=save)
    print(save(cells, final=True), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
