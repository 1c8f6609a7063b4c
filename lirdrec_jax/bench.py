"""Benchmark one grid point of any model at the scale of MMRec's datasets, on synthetic data.

  python -m lirdrec_jax.bench --scale baby [--epochs 2] [--json out.json]
  python -m lirdrec_jax.bench --config freedom --scale baby   # another model
  python -m lirdrec_jax.bench --scale baby --fast        # the CPU speed options
  python -m lirdrec_jax.bench --scale clothing --fast --matmul_dtype bfloat16
  python -m lirdrec_jax.bench --scale baby --sweep_points 4      # also: vmapped vs sequential
  python -m lirdrec_jax.bench --scale baby --reference /path/to/LIRDRec   # also the reference
  python -m lirdrec_jax.bench --scale elec --batches 5 [--convert]   # the largest, extrapolated

Generates a synthetic dataset with exactly the counts of the chosen scale, 4096-d image and
384-d text features, skewed item popularity and 5+ interactions per user, split per user like
MMRec's chronological 8:1:1 (about 74/13/13), from the project's one synthetic generator
(`lirdrec_jax.synthetic`); this measures speed, not accuracy. The scales (users / items /
interactions): MMRec's Amazon Baby 19,445 / 7,050 / 160,792, Sports 35,598 / 18,357 / 296,337,
Clothing 39,387 / 23,033 / 278,677 and Electronics ('elec') 192,403 / 63,001 / 1,689,188
(MMRec's evaluation/README.md), and 'microlens' 100,000 / 19,738 / 719,405: the published
counts of MicroLens-100K, not of MMRec's own filtered copy of MicroLens (which has no published
counts; with its files, `python -m data_prep.mmrec` prints them). At the two largest (more than
`CANDIDATE_PAIRS` user-item pairs) each user draws its items from 2,048 candidates
(`synthetic.sample_interactions`) instead of from all items, which would take tens of minutes.

It then trains the config's first grid point (by default LIRDRec's: the reference's default
point, batch 2048, 64-d, two user-item layers) on every visible device and reports each phase
with its wall time and the peak host RSS after it: data generation (and the stand-ins of a
model's extra input files), with --convert writing the data in MMRec's layout to a temporary
folder and the first `load_mmrec` of it (validation + cache; Elec's features are about 1 GB),
preparation (adjacency, samplers, evaluation splits), the point's frozen inputs (the kNN item
graph, feature views), placement and initialisation, the per-epoch host inputs (batch sampling,
per-epoch graphs), compilation, training and one evaluation of all valid + test users. Then:
the epoch time (with --batches N: the first N batches of each epoch timed, the epoch
extrapolated as n_batches / N x that, both printed), the evaluation, peak device memory (where
the backend reports it), parameter count, the dense-matmul floor measured on this machine (GEMM
rate x the model's analytic FLOP count, `flops_per_batch`) and the epoch time as a multiple of
it; a table; and the same as JSON (--json).

With --reference, the model's parity module times the PyTorch reference on the same data (its
graph build, per-epoch host work, the same batches timed, evaluation), by default in a child
process started after ours has freed its arrays, so that its peak RSS is its own; ratios are
printed. A reference that builds a dense n_items x n_items similarity matrix (LIRDRec's and
FREEDOM's kNN graph: 14.8 GiB at Elec scale) builds it only if the memory is available
(`--reference_graph`); otherwise it reads our kNN graph from its own cache file and the report
says that its graph build was not measured, and why.

On a GPU or TPU the same command measures the same quantities on all local devices (the item
features and the towers' work split over them, users split for evaluation), reports each
device's peak memory from `memory_stats()`, and computes the floor from the GEMM rate it
measures on one device times the device count.
"""
import argparse
import contextlib
import gc
import importlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lirdrec_jax import (cli, grid, model_inputs, models, parallel, progress, sampling,
                         synthetic, train)
from lirdrec_jax.data import Interactions, MMRecDataset
from lirdrec_jax.models import base

# (users, items, interactions): MMRec's preprocessed Amazon datasets (Baby, Sports, Clothing,
# Electronics: evaluation/README.md of enoche/MMRec) and MicroLens-100K's published counts
# (MMRec's own MicroLens copy publishes none).
SCALES = {'baby': (19445, 7050, 160792), 'sports': (35598, 18357, 296337),
          'clothing': (39387, 23033, 278677), 'elec': (192403, 63001, 1689188),
          'microlens': (100000, 19738, 719405),
          'small': (1499, 700, 25976),  # the size of the embedded default dataset
          'tiny': (600, 300, 4000)}  # for tests of this command
IMAGE_DIM, TEXT_DIM = 4096, 384
EVAL_REPEATS = 3  # evaluations timed after the first (which compiles); the best is reported
# Above this many user-item pairs, each synthetic user draws from CANDIDATE_ITEMS candidates
# (`synthetic.sample_interactions`): MicroLens and Elec scale; the Amazon scales below it keep
# the data they always had.
CANDIDATE_PAIRS = 10 ** 9
CANDIDATE_ITEMS = 2048


# ----------------------------------------------------------------------------------------------
# Phases: wall time and peak RSS
# ----------------------------------------------------------------------------------------------

def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM of /proc/self/status on Linux (getrusage's
    ru_maxrss is kept across exec, so a child process would report its parent's peak if
    larger), else ru_maxrss."""
    peak = proc_kib_field('/proc/self/status', 'VmHWM')
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == 'darwin' else peak * 1024)


def proc_kib_field(path: str, key: str) -> Optional[int]:
    """Bytes of the `key:` line (in kB) of a Linux /proc file such as /proc/self/status or
    /proc/meminfo; None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_bytes() -> Optional[int]:
    """Resident set size of this process now (Linux), else None."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError, IndexError):
        return None


class Phases:
    """The wall seconds of named phases (a phase timed several times adds up) and the peak
    host RSS of the process after each, in the order they first ran; `on_phase(as_dict())` is
    called after each (e.g. to save the progress of a child process), and with `show` one
    progress line is written per finished phase (long runs: an Elec-scale benchmark takes tens
    of minutes)."""

    def __init__(self, on_phase: Optional[Callable[[dict], None]] = None, show: bool = False,
                 prefix: str = 'bench'):
        self._phases, self._on_phase = {}, on_phase
        self._show, self._prefix = show, prefix

    @contextlib.contextmanager
    def time(self, name: str):
        self._phases.setdefault(name, {'seconds': 0.0})  # ordered by start: nested ones after
        start = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        entry = self._phases.setdefault(name, {'seconds': 0.0})
        entry['seconds'] += seconds
        entry['peak_rss_bytes'] = peak_rss_bytes()
        if self._show:
            progress.write(f'{self._prefix}: {PHASE_LABELS.get(name, name)}: {seconds:.1f} s '
                           f'(peak RSS {_gb(entry["peak_rss_bytes"])})')
        if self._on_phase is not None:
            self._on_phase(self.as_dict())

    def seconds(self, name: str) -> Optional[float]:
        return self._phases[name]['seconds'] if name in self._phases else None

    def as_dict(self) -> dict:
        """{phase: {'seconds', 'peak_rss_bytes'}} of the finished phases, in the order they
        first started."""
        return {k: dict(v) for k, v in self._phases.items() if 'peak_rss_bytes' in v}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def candidate_items_for(n_users: int, n_items: int) -> int:
    """The generator's candidate items per user at these counts (0 = all items)."""
    return CANDIDATE_ITEMS if n_users * n_items > CANDIDATE_PAIRS else 0


def generate(n_users: int, n_items: int, n_interactions: int, *, seed: int = 0,
             image_dim: int = IMAGE_DIM, text_dim: int = TEXT_DIM, item_text: bool = False,
             candidate_items: Optional[int] = None) -> synthetic.SyntheticData:
    """`synthetic.generate_exact_counts` with these counts; `candidate_items` None: by the
    counts (`candidate_items_for`)."""
    if candidate_items is None:
        candidate_items = candidate_items_for(n_users, n_items)
    return synthetic.generate_exact_counts(n_users, n_items, n_interactions, seed=seed,
                                           image_dim=image_dim, text_dim=text_dim,
                                           item_text=item_text, candidate_items=candidate_items)


def needs_item_texts(input_files) -> bool:
    """Whether a model's extra input files include a sparse one (built from item texts)."""
    return any(getattr(f, 'kind', 'dense') == 'sparse' for f in input_files)


def synthetic_dataset(n_users: int, n_items: int, n_interactions: int, *, seed: int = 0,
                      image_dim: int = IMAGE_DIM, text_dim: int = TEXT_DIM,
                      name: str = 'bench', input_files=(),
                      candidate_items: Optional[int] = None) -> MMRecDataset:
    """Exactly these counts, Amazon-like shape: see `lirdrec_jax.synthetic.generate_exact_counts`
    (and `generate`). A model's extra input files (`input_files`) get their stand-ins in `extra`
    (`model_inputs.with_no_llm_inputs`; sparse ones from generated item texts)."""
    data = generate(n_users, n_items, n_interactions, seed=seed, image_dim=image_dim,
                    text_dim=text_dim, item_text=needs_item_texts(input_files),
                    candidate_items=candidate_items)
    return model_inputs.with_no_llm_inputs(synthetic.to_dataset(data, name), input_files,
                                           data.item_text)


def time_conversion(data: synthetic.SyntheticData, name: str, phases: Phases) -> dict:
    """Writes `data` in MMRec's layout (`<name>.inter`, image_feat.npy, text_feat.npy) to a
    temporary folder and times `data.load_mmrec`'s first load of it (reading, validation,
    writing the `.npz` cache). Phases 'convert_write' and 'convert_load'. Returns what was
    written and loaded, or why the conversion could not run."""
    from lirdrec_jax import data as data_lib
    n_items = int(data.image_feat.shape[0])
    if int(data.items.max()) + 1 != n_items:
        # MMRec counts n_items as max itemID + 1: the feature rows would not match.
        return {'skipped': f'item {n_items - 1} has no interaction, so the MMRec files would '
                           f'give n_items={int(data.items.max()) + 1}, not {n_items}'}
    with tempfile.TemporaryDirectory(prefix='lirdrec_bench_convert_') as tmp:
        folder = Path(tmp) / name
        folder.mkdir()
        with phases.time('convert_write'):
            with open(folder / f'{name}.inter', 'w', encoding='utf-8', newline='\n') as f:
                f.write(synthetic.format_inter(data))
            np.save(folder / 'image_feat.npy', data.image_feat)
            np.save(folder / 'text_feat.npy', data.text_feat)
        written = sum(p.stat().st_size for p in folder.iterdir())
        with phases.time('convert_load'):
            loaded = data_lib.load_mmrec(tmp, name)
        cache = sum(p.stat().st_size for p in folder.rglob('*.npz'))
        rows = sum(s.users.size for s in (loaded.train, loaded.valid, loaded.test))
    return {'written_bytes': written, 'cache_bytes': cache,
            'loaded': [loaded.n_users, loaded.n_items, int(rows)]}


# ----------------------------------------------------------------------------------------------
# Machine measurements
# ----------------------------------------------------------------------------------------------

def gemm_rate(dtype: str = 'float32', n: int = 2048, repeats: int = 5, rounds: int = 3) -> float:
    """Best-of-`rounds` FLOP/s of an (n, n) @ (n, n) matmul on the default device (float32, or
    bfloat16 inputs with float32 accumulation)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    best = float('inf')
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeats):
            f(a).block_until_ready()
        best = min(best, (time.perf_counter() - t) / repeats)
    return 2 * n ** 3 / best


def device_peak_bytes(devices) -> Optional[int]:
    """The largest per-device peak memory, where the backend reports it (GPU/TPU), else None."""
    peaks = []
    for d in devices:
        stats = d.memory_stats() if hasattr(d, 'memory_stats') else None
        if stats and 'peak_bytes_in_use' in stats:
            peaks.append(int(stats['peak_bytes_in_use']))
    return max(peaks) if peaks else None


def problem_size(cfg, dataset: MMRecDataset) -> base.ProblemSize:
    """The sizes of `dataset` at `cfg`'s point that a model's analytic FLOP count
    (`flops_per_batch`) reads: counts, batch size, feature widths, extra input widths."""
    model = models.get_model(cfg.model_name)
    dims = tuple(int(x.shape[1]) for x in (dataset.image_feat, dataset.text_feat)
                 if x is not None)
    inputs = tuple(int(dataset.extra[f.field].shape[1]) for f in model.input_files)
    return base.ProblemSize(dataset.n_users, dataset.n_items, int(dataset.train.users.size),
                            int(cfg.train.batch_size), dims, inputs)


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------

def bench_config(args):
    """The config's first grid point (`--config`, by default LIRDRec's defaults: the
    reference's default point) with this run's speed options."""
    spec = args.config + (',fast' if args.fast and ':' in args.config else
                          ':fast' if args.fast else '')
    cfg = cli.load_config(spec)
    for flag, field, wanted in (('--matmul_dtype', 'matmul_dtype', args.matmul_dtype != 'float32'),
                                ('--transposed_features', 'transposed_features',
                                 args.transposed_features)):
        if wanted and field not in cfg.model:
            raise SystemExit(f'error: {flag}: model {cfg.model_name!r} has no config field '
                             f'model.{field}')
    if 'matmul_dtype' in cfg.model:
        cfg.model.matmul_dtype = args.matmul_dtype
        if args.matmul_dtype == 'bfloat16':
            cfg.model.cpu_dot = 'xla'  # Eigen dots are a config error with bfloat16
    if args.transposed_features:
        cfg.model.transposed_features = True
    if args.cpu_dot is not None:
        cfg.model.cpu_dot = args.cpu_dot
    if args.spmm_impl is not None:
        cfg.graph.spmm_impl = args.spmm_impl
    if args.spmm_chunk_size is not None:
        cfg.graph.spmm_chunk_size = args.spmm_chunk_size
    cfg.train.scan_epoch = not args.no_scan_epoch
    cfg.parallel.num_devices = args.devices
    return grid.expand_grid(cfg)[0].config


def eval_repeats(args) -> int:
    """Evaluations timed after the first: --eval_repeats, by default EVAL_REPEATS, or none
    with --batches (a quick look at a large scale: one full evaluation)."""
    if getattr(args, 'eval_repeats', None) is not None:
        return int(args.eval_repeats)
    return 0 if getattr(args, 'batches', 0) else EVAL_REPEATS


def timed_batches(n_batches: int, batches: int) -> int:
    """Batches timed per epoch: the first `batches` (0 = all) of the epoch's n_batches."""
    return min(batches, n_batches) if batches else n_batches


def _time_epochs(cfg, data, partitioner, n_epochs: int, phases: Phases, batches: int = 0,
                 repeats: int = EVAL_REPEATS) -> dict:
    """The point's frozen inputs and set-up, compilation, `n_epochs` epochs (of their first
    `batches` batches, 0 = all) and one evaluation (valid + test) plus `repeats`, timed."""
    ds = data.dataset
    model = models.get_model(cfg.model_name)
    with phases.time('frozen_inputs'):
        frozen_host = model.frozen_inputs(data.model, ds, cfg.model)
    with phases.time('setup'):
        setup = train.setup_point(cfg, data, partitioner, frozen_host=frozen_host)
        jax.block_until_ready((setup.frozen, setup.state))
    del frozen_host
    state, frozen = setup.state, setup.frozen
    fns = train.make_epoch_fns(setup, partitioner, str(cfg.eval.get('embeddings', 'last_batch')))
    kind = sampling.batch_kind(model.batch_kind)
    host = model.host_init(cfg.model)

    def epoch_host(e):
        """The epoch's batches and per-epoch inputs, drawn and placed on the host side."""
        nonlocal host
        with phases.time('epoch_inputs'):
            batches_e = kind.draw(sampling.epoch_rng(0, e), data.sampler,
                                  int(cfg.train.batch_size))
            host, scalars = train.epoch_scalars(model, cfg, host, e)
            key = jax.random.fold_in(setup.epoch_key, e)
            inputs = train.place_epoch_inputs(
                partitioner, model.epoch_inputs(data.model, cfg.model, key, e), setup.options)
            out = (batches_e, inputs, partitioner.replicate(train.device_scalars(scalars)),
                   partitioner.replicate(key))
            jax.block_until_ready(out[1:])
        return out

    host_seconds = []
    before = phases.seconds('epoch_inputs') or 0.0
    epoch_batches, inputs, scalars, key = epoch_host(0)
    host_seconds.append(phases.seconds('epoch_inputs') - before)
    n_batches = int(jax.tree.leaves(epoch_batches)[0].shape[0])
    n_timed = timed_batches(n_batches, batches)
    head = lambda b: type(b)(*(a[:n_timed] for a in b))
    with phases.time('compile'):
        if setup.options.scan_epoch:
            fns.epoch.lower(state, train.place_batches(partitioner, head(epoch_batches)), frozen,
                            inputs, scalars, key, None, jnp.int32(0)).compile()
        else:
            first = train.place_batches(partitioner, epoch_batches)
            fns.step.lower(state, type(first)(*(a[0] for a in first)), frozen, inputs, scalars,
                           key, jnp.int32(0), None).compile()
    measured = []
    for e in range(n_epochs):
        if e > 0:
            before = phases.seconds('epoch_inputs')
            epoch_batches, inputs, scalars, key = epoch_host(e)
            host_seconds.append(phases.seconds('epoch_inputs') - before)
        state = jax.block_until_ready(fns.start_epoch(state, None))
        with phases.time('train'):
            t = time.perf_counter()
            state, _ = train.run_epoch(fns, state, head(epoch_batches), frozen, inputs, scalars,
                                       key, None, e, partitioner, setup.options.scan_epoch,
                                       show_progress=False)
            measured.append(time.perf_counter() - t)
    evals = []
    for r in range(repeats + 1):  # the first includes compiling the ranking
        t = time.perf_counter()
        with phases.time('evaluate') if r == 0 else contextlib.nullcontext():
            users, items = fns.eval_embeddings(state.params, state.carry, frozen, inputs, scalars)
            train.evaluate_splits(users, items, data, cfg.eval, partitioner)
        evals.append(time.perf_counter() - t)
    scale = n_batches / n_timed
    return {'compile_seconds': phases.seconds('compile'), 'n_batches': n_batches,
            'batches_timed': n_timed, 'epoch_measured_seconds': measured,
            'epoch_seconds': [scale * m for m in measured],
            'epoch_extrapolated': n_timed < n_batches,
            'batch_seconds': min(measured) / n_timed, 'epoch_host_seconds': host_seconds,
            'eval_seconds': min(evals[1:]) if repeats else evals[0],
            'eval_first_seconds': evals[0], 'eval_repeats': repeats,
            'params': count_params(state.params)}


def _time_sweep(cfg, data, partitioner, n_points: int) -> dict:
    """One epoch of `n_points` points (different seeds) vmapped, after compilation."""
    cfgs = grid.seed_variants(cfg, n_points)
    for c in cfgs:
        c.train.epochs = 2
        c.train.eval_step = 1000  # time training only
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        results = train.train_points(cfgs, data, [Path(d) / str(i) for i in range(n_points)],
                                    partitioner=partitioner,
                                    labels=[f'sweep point {i}' for i in range(n_points)])
        total = time.perf_counter() - t
    seconds = [r['history'][-1]['train_seconds'] for r in results]
    return {'points': n_points, 'epoch_seconds': seconds[0], 'first_epoch_seconds':
            results[0]['history'][0]['train_seconds'], 'total_seconds': total}


def _machine() -> str:
    return f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores'


def _ours(args, cfg, dataset: MMRecDataset, phases: Phases, reuse: Optional[dict] = None,
          reused: Optional[list] = None) -> dict:
    """Everything measured of our implementation on `dataset` (its arrays are freed when this
    returns, unless `reuse` keeps them)."""
    n_users, n_items, n_inter = dataset.n_users, dataset.n_items, SCALES[args.scale][2]
    model = models.get_model(cfg.model_name)
    data = reused_or_made(reuse, ('prepare', args.scale, cfg.model_name), phases, 'prepare',
                          lambda: train.prepare_data(dataset, cfg.model_name), reused)
    partitioner = train.create_partitioner(cfg.parallel)
    rate_before = gemm_rate('float32')
    timing = _time_epochs(cfg, data, partitioner, args.epochs, phases, args.batches,
                          eval_repeats(args))
    rate_after = gemm_rate('float32')
    rate = max(rate_before, rate_after)
    if model.flops_per_batch is None:
        raise SystemExit(f'error: model {cfg.model_name!r} has no FLOP count (flops_per_batch)')
    flops = model.flops_per_batch(cfg.model, problem_size(cfg, dataset)) * timing['n_batches']
    floor = flops / (rate * partitioner.n_devices)
    epoch_min = min(timing['epoch_seconds'])
    result = {
        'model': cfg.model_name, 'scale': args.scale, 'users': n_users, 'items': n_items,
        'interactions': n_inter, 'train_rows': int(dataset.train.users.size),
        'batch_size': int(cfg.train.batch_size), 'machine': _machine(),
        'jax': jax.__version__, 'backend': parallel.platform(),
        'devices': partitioner.describe(),
        'options': dict(train.run_options(cfg)._asdict()), **timing,
        'epoch_min_seconds': epoch_min,
        'gemm_gflops_float32': rate / 1e9, 'gemm_gflops_before_after': [rate_before / 1e9,
                                                                       rate_after / 1e9],
        'gflop_per_epoch': flops / 1e9, 'floor_seconds_float32': floor,
        'epoch_over_floor': epoch_min / floor,
    }
    if args.matmul_dtype == 'bfloat16':
        bf16 = gemm_rate('bfloat16')
        result['gemm_gflops_bfloat16'] = bf16 / 1e9
        result['floor_seconds_bfloat16'] = flops / (bf16 * partitioner.n_devices)
        result['epoch_over_bfloat16_floor'] = epoch_min / result['floor_seconds_bfloat16']
    if args.sweep_points > 1:
        s = _time_sweep(cfg, data, partitioner, args.sweep_points)
        s['sequential_estimate_seconds'] = args.sweep_points * epoch_min
        s['speedup'] = s['sequential_estimate_seconds'] / s['epoch_seconds']
        result['sweep'] = s
    result['device_peak_bytes'] = device_peak_bytes(partitioner.mesh.devices.flat)
    return result


def reused_or_made(reuse: Optional[dict], key: tuple, phases: Phases, phase: str,
                   make: Callable, reused: Optional[list] = None):
    """`reuse[key]` when there (`phase` then not timed; its name appended to `reused`), else
    `make()` timed as `phase` (and kept in `reuse` unless it is None)."""
    if reuse is not None and key in reuse:
        if reused is not None:
            reused.append(phase)
        return reuse[key]
    with phases.time(phase):
        value = make()
    if reuse is not None:
        reuse[key] = value
    return value


def scale_dataset(scale: str, model_name: str, phases: Phases, reuse: Optional[dict] = None,
                  reused: Optional[list] = None,
                  data: Optional[synthetic.SyntheticData] = None) -> MMRecDataset:
    """The synthetic dataset of `scale` with `model_name`'s input stand-ins (phases 'generate'
    and 'model_inputs'; `data`: already generated). With `reuse` (a dict the caller keeps across
    runs), the generated data is made once per scale, with item texts, so that every model can
    use it."""
    n_users, n_items, n_inter = SCALES[scale]
    model = models.get_model(model_name)
    texts = reuse is not None or needs_item_texts(model.input_files)
    if data is None:
        data = reused_or_made(reuse, ('generate', scale), phases, 'generate',
                              lambda: generate(n_users, n_items, n_inter, item_text=texts),
                              reused)
    # A model's extra input files (e.g. MLLMRec's LLM-derived matrices, DGVAE's word view) are
    # their no-LLM stand-ins here: the synthetic data has no files, and this measures speed.
    return reused_or_made(
        reuse, ('model_inputs', scale, model_name), phases, 'model_inputs',
        lambda: model_inputs.with_no_llm_inputs(synthetic.to_dataset(data, scale),
                                                model.input_files, data.item_text), reused)


def run_benchmark(args, reuse: Optional[dict] = None) -> dict:
    """Everything the command measures, as a dict (`format_report` prints it).

    `reuse`: a dict the caller keeps across calls (e.g. `lirdrec_jax.accelerator`, which times
    every model at a scale in one process): the generated data, each model's dataset with its
    input stand-ins and its prepared data are taken from it when there, else made and kept in
    it; the phases of what was taken are not timed again and are listed in result['reused'].
    """
    n_users, n_items, n_inter = SCALES[args.scale]
    cfg = train.for_platform(bench_config(args))
    if args.reference:
        _reference_function(cfg)  # a missing parity module is an error before any work
        if not Path(args.reference).is_dir():
            raise SystemExit(f'error: --reference {args.reference}: no such folder (a clone of '
                             f"the model's reference repository)")
    phases = Phases(show=getattr(args, 'show_phases', True))
    candidates = candidate_items_for(n_users, n_items)
    reused, data, convert = [], None, None
    if args.convert:
        texts = needs_item_texts(models.get_model(cfg.model_name).input_files)
        with phases.time('generate'):
            data = generate(n_users, n_items, n_inter, candidate_items=candidates,
                            item_text=texts)
        convert = time_conversion(data, args.scale, phases)
    dataset = scale_dataset(args.scale, cfg.model_name, phases, reuse, reused, data)
    del data
    child_folder = None
    try:
        if args.reference and not args.reference_in_process:
            child_folder = write_reference_inputs(dataset, cfg, args)
        result = _ours(args, cfg, dataset, phases, reuse, reused)
        result['candidate_items'] = candidates
        if reused:
            result['reused'] = reused
        if convert is not None:
            result['convert'] = convert
        result['phases'] = phases.as_dict()
        result['peak_rss_bytes'] = peak_rss_bytes()
        if args.reference:
            if child_folder is None:
                result['reference'] = _reference(args, dataset, cfg)
            else:
                del dataset  # the child reads its own copy
                jax.clear_caches()
                gc.collect()
                result['reference'] = run_reference_child(child_folder, current_rss_bytes())
    finally:
        if child_folder is not None:
            shutil.rmtree(child_folder, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------

def _reference_function(cfg) -> Callable:
    """The model's parity module's `run_reference_benchmark`, or a one-line error."""
    hooks = models.get_model(cfg.model_name).parity
    if hooks is None:
        raise SystemExit(f'error: --reference: model {cfg.model_name!r} has no parity module')
    try:
        module = importlib.import_module(hooks.module)
        return module.run_reference_benchmark
    except (ImportError, AttributeError) as err:
        raise SystemExit(f'error: --reference needs {hooks.module}.run_reference_benchmark, '
                         f'which is not available ({err})')


def _reference(args, dataset, cfg) -> dict:
    """The PyTorch reference on the same data, in this process, through the model's parity
    module (`run_reference_benchmark(path, dataset, args, point_cfg) -> dict`, returning any of
    the keys 'phases', 'n_batches', 'batches_timed', 'epoch_measured_seconds',
    'epoch_seconds' (a list; extrapolated when fewer batches were timed), 'batch_seconds',
    'epoch_host_seconds', 'eval_seconds', 'parameters', 'graph'; ratios are printed for the
    ones present)."""
    result = _call_reference(cfg, args.reference, dataset, args)
    result.setdefault('process', 'same')
    return result


def _call_reference(cfg, checkout, dataset, args) -> dict:
    """The parity module's `run_reference_benchmark`; a checkout it cannot use is one `error:`
    line."""
    from lirdrec_jax.parity import reference
    try:
        return _reference_function(cfg)(checkout, dataset, args, cfg)
    except reference.ReferenceError_ as err:
        raise SystemExit(f'error: --reference {checkout}: {err}')


REFERENCE_REQUEST = 'request.json'
REFERENCE_RESULT = 'result.json'
REFERENCE_PROGRESS = 'progress.json'


def write_reference_inputs(dataset: MMRecDataset, cfg, args, folder=None) -> Path:
    """Everything a child process needs to time the reference (`reference_child_main`): the
    dataset (`save_dataset`) and the request (checkout, point config, epochs, batches,
    evaluations, graph choice) in `folder` (default: a new temporary folder)."""
    folder = Path(folder or tempfile.mkdtemp(prefix='lirdrec_bench_ref_'))
    save_dataset(folder, dataset)
    request = {'checkout': str(Path(args.reference).absolute()),
               'config': cfg.copy_and_resolve_references().to_dict(),
               'epochs': int(args.epochs), 'batches': int(args.batches or 0),
               'eval_repeats': eval_repeats(args), 'reference_graph': args.reference_graph}
    (folder / REFERENCE_REQUEST).write_text(json.dumps(request, default=list))
    return folder


def save_dataset(folder: Path, dataset: MMRecDataset) -> None:
    """`dataset` as files in `folder` (`load_saved_dataset` reads them back): splits and counts
    in dataset.npz, each feature table and dense extra input as .npy, sparse ones as .npz."""
    import scipy.sparse as sp
    splits = {f'{s}_{f}': getattr(getattr(dataset, s), f)
              for s in ('train', 'valid', 'test') for f in ('users', 'items')}
    np.savez(folder / 'dataset.npz', name=dataset.name, n_users=dataset.n_users,
             n_items=dataset.n_items, extra=json.dumps(sorted(dataset.extra)), **splits)
    for key in ('image_feat', 'text_feat'):
        if getattr(dataset, key) is not None:
            np.save(folder / f'{key}.npy', getattr(dataset, key))
    for field, value in dataset.extra.items():
        if sp.issparse(value):
            sp.save_npz(folder / f'extra_{field}.npz', value.tocsr())
        else:
            np.save(folder / f'extra_{field}.npy', value)


def load_saved_dataset(folder: Path) -> MMRecDataset:
    """The dataset `save_dataset` wrote (feature tables memory-mapped)."""
    import scipy.sparse as sp
    z = np.load(folder / 'dataset.npz')
    split = lambda s: Interactions(z[f'{s}_users'], z[f'{s}_items'])
    feat = lambda key: (np.load(folder / f'{key}.npy', mmap_mode='r')
                        if (folder / f'{key}.npy').is_file() else None)
    extra = {}
    for field in json.loads(str(z['extra'])):
        sparse = folder / f'extra_{field}.npz'
        extra[field] = (sp.load_npz(sparse).tocsr() if sparse.is_file()
                        else np.load(folder / f'extra_{field}.npy'))
    return MMRecDataset(str(z['name']), int(z['n_users']), int(z['n_items']), split('train'),
                        split('valid'), split('test'), feat('image_feat'), feat('text_feat'),
                        model_inputs.as_mapping(extra))


def reference_child_main(folder) -> None:
    """The child process of --reference: times the reference on the saved dataset, writing
    the phases so far to progress.json after each and the result to result.json."""
    import ml_collections
    folder = Path(folder)
    request = json.loads((folder / REFERENCE_REQUEST).read_text())
    cfg = ml_collections.ConfigDict(request['config'])
    args = argparse.Namespace(epochs=request['epochs'], batches=request['batches'],
                              eval_repeats=request['eval_repeats'],
                              reference_graph=request['reference_graph'],
                              on_phase=lambda phases: _write_json(folder / REFERENCE_PROGRESS,
                                                                  phases))
    dataset = load_saved_dataset(folder)
    result = _call_reference(cfg, request['checkout'], dataset, args)
    result.update(process='child', peak_rss_bytes=peak_rss_bytes())
    _write_json(folder / REFERENCE_RESULT, result)


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(value, default=str))
    os.replace(tmp, path)


def run_reference_child(folder: Path, parent_rss: Optional[int]) -> dict:
    """Runs `reference_child_main` in a new Python process and returns its result; if it
    fails (e.g. killed when out of memory), the phases it finished and how it ended."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env['PYTHONPATH'] = os.pathsep.join([root] + [p for p in [env.get('PYTHONPATH')] if p])
    cmd = [sys.executable, '-m', 'lirdrec_jax.bench', '--reference_child', str(folder)]
    done = subprocess.run(cmd, env=env)
    result_file, progress_file = folder / REFERENCE_RESULT, folder / REFERENCE_PROGRESS
    if done.returncode == 0 and result_file.is_file():
        result = json.loads(result_file.read_text())
    else:
        how = (f'killed by signal {-done.returncode}' +
               (' (SIGKILL: out of memory?)' if done.returncode == -9 else '')
               if done.returncode < 0 else f'exit status {done.returncode}')
        result = {'failed': f'the reference process ended with {how}', 'process': 'child',
                  'phases': (json.loads(progress_file.read_text())
                             if progress_file.is_file() else {})}
    result['parent_rss_bytes'] = parent_rss
    return result


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------

def _gb(n) -> str:
    return 'n/a (backend does not report it)' if n is None else f'{n / 2 ** 30:.2f} GiB'


PHASE_LABELS = {
    'generate': 'generate data',
    'convert_write': 'convert: write MMRec files',
    'convert_load': 'convert: first load_mmrec (checks, cache)',
    'model_inputs': "stand-ins of the model's input files",
    'prepare': 'prepare (adjacency, samplers, eval splits)',
    'frozen_inputs': 'frozen inputs (kNN graph, feature views)',
    'setup': 'set-up (placement, initialisation)',
    'epoch_inputs': 'per-epoch host inputs, all epochs',
    'compile': 'compile the training program',
    'train': 'training, timed batches, all epochs',
    'evaluate': 'evaluation valid + test, first',
    # the reference's
    'loaders': 'data loaders',
    'construct': 'model construction',
    'adjacency': '  of which user-item adjacency',
    'graph': '  of which kNN item graph',
    'trainer': 'trainer',
}


def format_phases(phases: dict) -> list:
    lines = [f'{"phase":44s} {"seconds":>9s} {"peak RSS after":>15s}', '-' * 70]
    for name, p in phases.items():
        lines.append(f'{PHASE_LABELS.get(name, name):44s} {p["seconds"]:9.2f} '
                     f'{_gb(p.get("peak_rss_bytes")):>15s}')
    return lines


def _epoch_label(r: dict) -> str:
    if r.get('epoch_extrapolated'):
        return f'training epoch, extrapolated x{r["n_batches"] / r["batches_timed"]:.1f} (s)'
    return 'training epoch, best (s)'


def format_report(r: dict) -> str:
    epochs = ', '.join(f'{s:.2f}' for s in r['epoch_measured_seconds'])
    timed = (f'the first {r["batches_timed"]} of {r["n_batches"]} batches of each epoch timed, '
             f'the epoch extrapolated x{r["n_batches"] / r["batches_timed"]:.1f}'
             if r['epoch_extrapolated'] else f'all {r["n_batches"]} batches of each epoch timed')
    cand = (f'; each user drew from {r["candidate_items"]} candidate items'
            if r.get('candidate_items') else '')
    lines = [
        f'model {r["model"]}; machine: {r["machine"]}; jax {r["jax"]} on {r["backend"]}; '
        f'{r["devices"]}',
        f'data ({r["scale"]} scale, synthetic): {r["users"]} users, {r["items"]} items, '
        f'{r["interactions"]} interactions ({r["train_rows"]} train rows, {r["n_batches"]} '
        f'batches of {r.get("batch_size", 2048)}); features {IMAGE_DIM}-d image + {TEXT_DIM}-d '
        f'text{cand}',
        f'options: {r["options"]}',
        f'training: {timed}',
        '',
        *format_phases(r['phases']),
    ]
    if r.get('reused'):
        lines.append(f'(made by an earlier run in this process, not timed here: '
                     f'{", ".join(r["reused"])})')
    if 'convert' in r:
        c = r['convert']
        lines.append(f'(conversion skipped: {c["skipped"]})' if 'skipped' in c else
                     f'(conversion: {c["written_bytes"] / 2 ** 30:.2f} GiB written, cache '
                     f'{c["cache_bytes"] / 2 ** 30:.2f} GiB; loaded {c["loaded"][0]} users, '
                     f'{c["loaded"][1]} items, {c["loaded"][2]} interactions)')
    n_eval = r['eval_repeats']
    lines += [
        '',
        f'{"what":48s} {"ours":>12s}',
        '-' * 61,
        f'{"compile the training program (s)":48s} {r["compile_seconds"]:12.2f}',
        f'{"training, " + str(r["batches_timed"]) + " batches, measured, best (s)":48s} '
        f'{min(r["epoch_measured_seconds"]):12.2f}',
        f'{"  per batch (s)":48s} {r["batch_seconds"]:12.3f}',
        f'{_epoch_label(r):48s} {r["epoch_min_seconds"]:12.2f}',
        f'{"per-epoch host inputs (sampling), best (s)":48s} '
        f'{min(r["epoch_host_seconds"]):12.2f}',
        f'{"evaluation valid + test, " + (f"best of {n_eval}" if n_eval else "one") + " (s)":48s}'
        f' {r["eval_seconds"]:12.2f}',
        f'{"  first evaluation, with compile (s)":48s} {r["eval_first_seconds"]:12.2f}',
        f'{"peak host RSS":48s} {_gb(r["peak_rss_bytes"]):>12s}',
        f'{"peak device memory":48s} {_gb(r["device_peak_bytes"]):>12s}',
        f'{"parameters":48s} {r["params"]:12,d}',
        f'{"GEMM rate float32 (GFLOP/s, best)":48s} {r["gemm_gflops_float32"]:12.0f}',
        f'{"analytic GFLOP per epoch":48s} {r["gflop_per_epoch"]:12.0f}',
        f'{"floor: epoch at GEMM rate (s)":48s} {r["floor_seconds_float32"]:12.2f}',
        f'{"epoch / floor":48s} {r["epoch_over_floor"]:12.2f}x',
    ]
    if 'floor_seconds_bfloat16' in r:
        lines += [f'{"GEMM rate bfloat16 (GFLOP/s, best)":48s} {r["gemm_gflops_bfloat16"]:12.0f}',
                  f'{"epoch / bfloat16 floor":48s} {r["epoch_over_bfloat16_floor"]:12.2f}x']
    if 'sweep' in r:
        s = r['sweep']
        lines += [f'{"vmapped epoch, " + str(s["points"]) + " points (s)":48s} '
                  f'{s["epoch_seconds"]:12.2f}',
                  f'{"  sequential: points x epoch (s)":48s} '
                  f'{s["sequential_estimate_seconds"]:12.2f}',
                  f'{"  speed-up":48s} {s["speedup"]:12.2f}x']
    lines += ['', f'measured training per epoch (s): {epochs}; GEMM GFLOP/s before/after '
              'training: ' + ', '.join(f'{g:.0f}' for g in r['gemm_gflops_before_after'])
              + ' (a large gap means a noisy machine)']
    if 'reference' in r:
        lines += ['', _reference_section(r, r['reference'])]
    if r['backend'] == 'cpu':
        lines += ['', 'On a GPU/TPU the same command uses every local device (the model places '
                  'its inputs, e.g. LIRDRec splits item features and tower work over them; '
                  'users are split for evaluation), reports peak device memory, and measures '
                  'the floor on the device.']
    return '\n'.join(lines)


def _min(values):
    return min(values) if values else None


def _reference_section(ours: dict, ref: dict) -> str:
    lines = ['the PyTorch reference on the same data'
             + (' (in a child process, after ours freed its arrays; '
                f'this process held {_gb(ref.get("parent_rss_bytes"))} meanwhile)'
                if ref.get('process') == 'child' else ' (in this process, after ours)')]
    if ref.get('phases'):
        lines += format_phases(ref['phases'])
    if ref.get('graph'):
        lines.append(f'kNN graph: {ref["graph"]}')
    if ref.get('failed'):
        lines.append(f'{ref["failed"]}; the phases above are the ones it finished')
        return '\n'.join(lines)
    phase = lambda r, name: (r.get('phases') or {}).get(name, {}).get('seconds')
    extrapolated = ours.get('epoch_extrapolated') or ref.get('epoch_extrapolated')
    epoch_name = ('training epoch, extrapolated (s)' if extrapolated
                  else 'training epoch, best (s)')
    rows = [('kNN graph / frozen inputs (s)', phase(ours, 'frozen_inputs'), phase(ref, 'graph')),
            ('training per batch, measured (s)', ours.get('batch_seconds'),
             ref.get('batch_seconds')),
            (epoch_name, ours.get('epoch_min_seconds'), _min(ref.get('epoch_seconds'))),
            ('per-epoch host work, best (s)', _min(ours.get('epoch_host_seconds')),
             _min(ref.get('epoch_host_seconds'))),
            ('evaluation valid + test (s)', ours.get('eval_seconds'), ref.get('eval_seconds')),
            ('peak host RSS (GiB)', ours.get('peak_rss_bytes', 0) / 2 ** 30,
             ref['peak_rss_bytes'] / 2 ** 30
             if ref.get('peak_rss_bytes') and ref.get('process') == 'child' else None)]
    lines += ['', f'{"what":40s} {"ours":>10s} {"reference":>10s} {"ref / ours":>10s}',
              '-' * 73]
    for name, a, b in rows:
        if a is None or b is None:
            continue
        lines.append(f'{name:40s} {a:10.3f} {b:10.3f} {b / a if a else float("nan"):10.2f}')
    if ref.get('parameters') and ours.get('params'):
        lines.append(f'{"parameters that train":40s} {ours["params"]:10d} '
                     f'{ref["parameters"]:10d} {ref["parameters"] / ours["params"]:10.2f}')
    if ref.get('batches_timed') is not None:
        lines.append(f'(the reference timed the first {ref["batches_timed"]} of its '
                     f'{ref["n_batches"]} batches per epoch'
                     + (', the epoch extrapolated' if ref.get('epoch_extrapolated') else '')
                     + f'; evaluations: {ref.get("eval_repeats", 0) + 1})')
    return '\n'.join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m lirdrec_jax.bench',
                                description=__doc__.splitlines()[0])
    p.add_argument('--config', default='lirdrec',
                   help='built-in config name or config file, [:variant], of the model to time '
                        '(its first grid point)')
    p.add_argument('--scale', choices=sorted(SCALES), default='baby')
    p.add_argument('--epochs', type=int, default=2, help='training epochs to time')
    p.add_argument('--batches', type=int, default=0,
                   help='time only the first N batches of each epoch and extrapolate the epoch '
                        '(n_batches / N x measured), for ours and the reference (0 = all)')
    p.add_argument('--eval_repeats', type=int, default=None,
                   help=f'evaluations timed after the first (default {EVAL_REPEATS}, with '
                        '--batches 0); the best is reported')
    p.add_argument('--convert', action='store_true',
                   help="also write the data in MMRec's layout to a temporary folder and time "
                        'its first load_mmrec (needs disk: about 1 GB at Elec scale)')
    p.add_argument('--json', help='also write the results to this JSON file')
    p.add_argument('--matmul_dtype', choices=('float32', 'bfloat16'), default='float32')
    p.add_argument('--fast', action='store_true',
                   help="the config's `fast` variant (the CPU speed options, e.g. "
                        'lirdrec:fast)')
    p.add_argument('--spmm_impl', choices=('segment_sum', 'bcoo'), default=None)
    p.add_argument('--spmm_chunk_size', type=int, default=None)
    p.add_argument('--transposed_features', action='store_true')
    p.add_argument('--cpu_dot', choices=('xla', 'eigen'), default=None,
                   help="XLA:CPU GEMM kernels of the training step (model.cpu_dot)")
    p.add_argument('--no_scan_epoch', action='store_true',
                   help='one dispatch per batch instead of one scan per epoch')
    p.add_argument('--devices', type=int, default=0, help='0 = all devices')
    p.add_argument('--sweep_points', type=int, default=0,
                   help='also time one vmapped epoch of this many points')
    p.add_argument('--reference', metavar='PATH',
                   help="a checkout of the model's reference repository (e.g. enoche/LIRDRec): "
                        'run it on the same data and print ratios')
    p.add_argument('--reference_in_process', action='store_true',
                   help='run the reference in this process after ours (default: in a child '
                        'process, so that its peak memory is its own)')
    p.add_argument('--reference_graph', choices=('auto', 'build', 'ours'), default='auto',
                   help="the reference's kNN item graph: built by the reference ('build'), or "
                        "ours written to its cache file ('ours': its graph build is then not "
                        "measured); 'auto': build it when its dense similarity matrix fits in "
                        'the available memory')
    p.add_argument('--reference_child', metavar='FOLDER', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reference_child:
        return args
    if args.epochs < 1:
        p.error('--epochs must be >= 1')
    if args.batches < 0:
        p.error('--batches must be >= 0 (0 = every batch)')
    if args.eval_repeats is not None and args.eval_repeats < 0:
        p.error('--eval_repeats must be >= 0')
    if args.batches and args.sweep_points > 1:
        p.error('--sweep_points times whole epochs; it cannot be combined with --batches')
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.reference_child:
        reference_child_main(args.reference_child)
        return {}
    result = run_benchmark(args)
    print(format_report(result), flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2, sort_keys=True, default=str)
    return result


if __name__ == '__main__':
    main()
