"""Every compiled program of a model's training and evaluation, built exactly as the trainer
builds it, exported for GPU and TPU from any machine, and measured by XLA's own analyses.

  python -m lirdrec_jax.lowering --config lirdrec [--scale tiny|small] [--platforms cuda,tpu]
                                 [--sweep_points 2]

On a synthetic dataset of the chosen scale (`bench.SCALES`, 'tiny' by default) the command
builds the programs of the config's first grid point (`programs`), exports each with
`jax.export` for the platforms (StableHLO lowered for every platform at once; nothing is
compiled for them), checks that no exported module calls back to the host or into a CPU-only
library (`check_portable`), compiles each program on this machine's backend and prints one line
per program: the platforms it exported for, the size of its serialized StableHLO, and XLA's
memory (peak MiB) and cost (GFLOP) analysis of the local compile. Exits 1 with an `error:` line
if any export fails.

The programs, with the names `programs` gives them:
  train_step, train_epoch, start_epoch, eval_embeddings: `train.make_epoch_fns` of one point
    (the step, the `lax.scan` over an epoch's batches, the model's start of an epoch, the
    embeddings evaluation ranks with);
  eval_topk: the ranking of one block of users per device (`evaluation._sharded_topk`, a
    `shard_map` over the users), and eval_item_order (`evaluation.item_order_jit`) for models
    that score by dot product;
  sweep_start_epoch, sweep_step, sweep_epoch (with sweep_points >= 2): the programs of a vmapped
    group of that many points differing in their seed, as `train.train_points` builds them.

Programs are built for a platform (`parallel.building_for`): built for GPU/TPU, the CPU-only
options of the config are off (`train.for_platform`), as a run there would have them. Their
arguments are what the trainer passes, placed as it places them, except the training state:
its `jax.ShapeDtypeStruct`s (shapes, dtypes, the replicated sharding), from the model's init
traced, not run (`train.setup_point(..., abstract=True)`), so that nothing is computed.
"""
import argparse
import re
import sys
import time
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from lirdrec_jax import evaluation, grid, models, parallel, train

EXPORT_PLATFORMS = ('cuda', 'tpu')
# jax.export's platform names -> the backend names of `parallel.platform()`.
BACKEND_OF = {'cpu': 'cpu', 'cuda': 'gpu', 'rocm': 'gpu', 'tpu': 'tpu'}
# Custom-call targets that pin a module to the host: Python callbacks (pure_callback,
# io_callback, debug.print) and the CPU's LAPACK / DUCC (FFT) kernels.
_HOST_TARGET = re.compile(r'callback|^lapack_|^ducc_|cpu', re.IGNORECASE)


class Program(NamedTuple):
    """One compiled program of a run.

    Attributes:
      name: what it is ('train_step', 'eval_topk', ...; module docstring).
      fn: the jitted function, the very object the trainer or evaluator calls.
      args: its positional arguments: arrays placed as the trainer places them, or
        `jax.ShapeDtypeStruct`s with their shardings (the training state, the evaluation
        embeddings).
    """
    name: str
    fn: Callable
    args: tuple


class ExportError(RuntimeError):
    """A program did not export for a platform, or its module is not portable."""


# ----------------------------------------------------------------------------------------------
# The programs
# ----------------------------------------------------------------------------------------------

def point_config(cfg):
    """The config's first grid point (a config with a single value per field)."""
    return grid.expand_grid(cfg)[0].config


def programs(cfg, data: train.PreparedData, partitioner: parallel.Partitioner, *,
             sweep_points: int = 0, platform: Optional[str] = None) -> Dict[str, Program]:
    """Every compiled program of training and evaluating `cfg`'s first grid point on `data`.

    Args:
      cfg: a model config (its first grid point is used).
      data: `train.prepare_data(dataset, cfg.model_name)`.
      partitioner: the devices (one device, or a mesh: batches, item features and evaluation
        users split as in training).
      sweep_points: with >= 2, also the programs of a vmapped group of that many points (the
        point's seed, seed + 1, ...).
      platform: build for 'cpu', 'gpu' or 'tpu' (`parallel.building_for`); None: this backend.

    Returns:
      {name: Program}, in the order of the module docstring.
    """
    cfg = point_config(cfg)
    ds = data.dataset
    train.check_point_config(cfg, ds.n_users, ds.n_items)
    with parallel.building_for(platform):
        cfg = train.for_platform(cfg)
        out = _point_programs(cfg, data, partitioner)
        if sweep_points >= 2:
            out.update(_sweep_programs(cfg, data, partitioner, sweep_points))
    return out


def _point_programs(cfg, data, partitioner) -> Dict[str, Program]:
    """The programs of one point trained alone, and its evaluation."""
    eval_mode = str(cfg.eval.get('embeddings', 'last_batch'))
    setup = train.setup_point(cfg, data, partitioner, abstract=True)
    model, state, frozen = setup.model, setup.state, setup.frozen
    fns = train.make_epoch_fns(setup, partitioner, eval_mode)
    drawn = train.draw_point_epoch(model, cfg, data, model.host_init(cfg.model), setup.epoch_key,
                                   0, partitioner, setup.options)
    g = train.group_epoch(partitioner, [drawn], None)
    batches = train.place_batches(partitioner, g.batches)
    first = type(batches)(*(a[0] for a in batches))
    step = (state, first, frozen, g.epoch_inputs, g.scalars, g.key, jnp.int32(0), None)
    epoch = (state, batches, frozen, g.epoch_inputs, g.scalars, g.key, None, jnp.int32(0))
    embed = (state.params, state.carry, frozen, g.epoch_inputs, g.scalars)
    out = {'train_step': Program('train_step', fns.step, step),
           'train_epoch': Program('train_epoch', fns.epoch, epoch),
           'start_epoch': Program('start_epoch', fns.start_epoch, (state, None)),
           'eval_embeddings': Program('eval_embeddings', fns.eval_embeddings, embed)}
    users, items = jax.eval_shape(fns.eval_embeddings, *embed)
    out.update(_ranking_programs(cfg, data, partitioner, model, users, items))
    return out


def _ranking_programs(cfg, data, partitioner, model, users, items) -> Dict[str, Program]:
    """The ranking of one block of users per device, as `evaluation.full_sort_topk` dispatches
    it for the shared ranking of valid and test users (`train.evaluate_splits`), and the item
    order it computes first for dot-product models. `users`, `items`: the shapes of the
    evaluation embeddings."""
    # full_sort_topk ranks float32 copies replicated on every device.
    as_ranked = lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32,
                                               sharding=partitioner.replicated)
    users, items = jax.tree.map(as_ranked, (users, items))
    n_dev = partitioner.n_devices
    block_users, rows, cols = evaluation.ranking_blocks(data.ranking.ranked,
                                                        int(cfg.eval.batch_size), n_dev)
    # The first dispatch: one block per device, users flat, split along the leading axis.
    split = tuple(partitioner.split(a, 0) for a in (block_users[:n_dev].reshape(-1),
                                                     rows[:n_dev], cols[:n_dev]))
    n_items = data.dataset.n_items
    order = jax.ShapeDtypeStruct((n_items,), jnp.int32, sharding=partitioner.replicated)
    ranked = evaluation._sharded_topk(partitioner, max(cfg.eval.topk), True, model.score)
    out = {'eval_topk': Program('eval_topk', ranked, (users, items, order) + split)}
    if model.score is None:
        out['eval_item_order'] = Program('eval_item_order', evaluation.item_order_jit,
                                         (users, items))
    return out


def _sweep_programs(cfg, data, partitioner, n_points: int) -> Dict[str, Program]:
    """The programs of a vmapped group of `n_points` points, built as `train.train_points`
    builds them (shared inputs placed once, states stacked, batches (n_batches, points, b))."""
    cfgs = grid.seed_variants(cfg, n_points)
    setups = train.setup_points(cfgs, data, partitioner, vmapped=True, abstract=True)
    model = setups[0].model
    state = train.stack_states(partitioner, [s.state for s in setups])
    frozen, frozen_axes = train.group_frozen(partitioner, setups)
    drawn = [train.draw_point_epoch(model, c, data, model.host_init(c.model), s.epoch_key, 0,
                                    partitioner, s.options) for c, s in zip(cfgs, setups)]
    g = train.group_epoch(partitioner, drawn, [True] * n_points)
    fns = train.make_epoch_fns(setups[0], partitioner,
                               str(cfg.eval.get('embeddings', 'last_batch')),
                               (frozen_axes, g.epoch_axes))
    batches = train.place_batches(partitioner, g.batches)
    first = type(batches)(*(a[0] for a in batches))
    step = (state, first, frozen, g.epoch_inputs, g.scalars, g.key, jnp.int32(0), g.active)
    epoch = (state, batches, frozen, g.epoch_inputs, g.scalars, g.key, g.active, jnp.int32(0))
    return {'sweep_start_epoch': Program('sweep_start_epoch', fns.start_epoch, (state, g.active)),
            'sweep_step': Program('sweep_step', fns.step, step),
            'sweep_epoch': Program('sweep_epoch', fns.epoch, epoch)}


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

def custom_call_targets(exported: jax.export.Exported) -> Dict[str, int]:
    """{target: count} of the custom calls in an exported module's StableHLO."""
    text = exported.mlir_module()
    names = re.findall(r'stablehlo\.custom_call\s+@([\w.$\-]+)', text)
    names += re.findall(r'call_target_name\s*=\s*"([^"]+)"', text)
    counts: Dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return counts


def check_portable(name: str, exported: jax.export.Exported) -> None:
    """ExportError unless the module of program `name` runs without the host: no effects (host
    callbacks and debug prints have them) and no custom call to a host callback or a CPU-only
    kernel (jax.export itself refuses custom calls without a compatibility guarantee)."""
    effects = tuple(exported.ordered_effects) + tuple(exported.unordered_effects)
    if effects:
        raise ExportError(f'program {name}: the exported module has side effects {effects} '
                          '(a host callback or debug print)')
    host = sorted(t for t in custom_call_targets(exported) if _HOST_TARGET.search(t))
    if host:
        raise ExportError(f'program {name}: the exported module calls {", ".join(host)}, '
                          'which run on the host only')


def export_program(program: Program, platforms: Sequence[str] = EXPORT_PLATFORMS
                   ) -> jax.export.Exported:
    """`program` exported for `platforms` at once (`jax.export.export`), checked portable."""
    try:
        exported = jax.export.export(program.fn, platforms=tuple(platforms))(*program.args)
    except Exception as err:  # jax.export raises several kinds; name the program
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f'program {program.name} does not export for '
                          f'{",".join(platforms)}: {first}') from err
    check_portable(program.name, exported)
    return exported


def export_all(progs: Dict[str, Program], platforms: Sequence[str] = EXPORT_PLATFORMS
               ) -> Dict[str, jax.export.Exported]:
    """{name: Exported} of every program for `platforms` (ExportError at the first failure)."""
    return {name: export_program(p, platforms) for name, p in progs.items()}


def module_bytes(exported: jax.export.Exported) -> int:
    """Bytes of the exported module's serialized StableHLO (portable bytecode), the bulk of
    `Exported.serialize()` (which also needs the flatbuffers package)."""
    return len(exported.mlir_module_serialized)


# ----------------------------------------------------------------------------------------------
# XLA's analyses of the local compile
# ----------------------------------------------------------------------------------------------

def compiled_stats(program: Program) -> dict:
    """XLA's memory and cost analyses of `program` compiled on this backend (per device for a
    program over several devices).

    Returns:
      {'argument_bytes', 'output_bytes', 'temp_bytes', 'alias_bytes',
       'generated_code_bytes': the buffer sizes of `Compiled.memory_analysis()` (arguments
         that the program does not read are pruned by jit and not counted; outputs that reuse
         a donated argument's buffer are counted in both output and alias),
       'peak_bytes': argument + output + temp - alias, the device memory the program needs
         with all its arguments and outputs resident,
       'xla_peak_bytes': XLA's own peak of its buffer assignment (`peak_memory_in_bytes`,
         0 where the backend does not compute it),
       'flops', 'bytes_accessed', 'transcendentals': `Compiled.cost_analysis()` (XLA's
         estimate from the optimised HLO; a loop body is counted once, not per trip)}.
    """
    compiled = program.fn.lower(*program.args).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jaxlibs: one dict per device program
        cost = cost[0] if cost else {}
    cost = cost or {}
    stats = {'argument_bytes': int(mem.argument_size_in_bytes),
             'output_bytes': int(mem.output_size_in_bytes),
             'temp_bytes': int(mem.temp_size_in_bytes),
             'alias_bytes': int(mem.alias_size_in_bytes),
             'generated_code_bytes': int(mem.generated_code_size_in_bytes),
             'xla_peak_bytes': int(getattr(mem, 'peak_memory_in_bytes', 0) or 0),
             'flops': float(cost.get('flops', 0.0)),
             'bytes_accessed': float(cost.get('bytes accessed', 0.0)),
             'transcendentals': float(cost.get('transcendentals', 0.0))}
    stats['peak_bytes'] = (stats['argument_bytes'] + stats['output_bytes']
                           + stats['temp_bytes'] - stats['alias_bytes'])
    return stats


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

def _synthetic_data(cfg, scale: str) -> train.PreparedData:
    from lirdrec_jax import bench
    n_users, n_items, n_inter = bench.SCALES[scale]
    model = models.get_model(cfg.model_name)
    dataset = bench.synthetic_dataset(n_users, n_items, n_inter, name=scale,
                                      input_files=model.input_files)
    return train.prepare_data(dataset, cfg.model_name)


def parse_platforms(text: str) -> tuple:
    """'cuda,tpu' -> ('cuda', 'tpu'); one `error:` line for an unknown name or a mix of the CPU
    with accelerators (whose programs differ: the CPU-only options)."""
    platforms = tuple(p.strip() for p in text.split(',') if p.strip())
    unknown = [p for p in platforms if p not in BACKEND_OF]
    if not platforms or unknown:
        raise SystemExit(f'error: --platforms {text!r}: expected a comma-separated list of '
                         f'{", ".join(BACKEND_OF)}')
    if len({BACKEND_OF[p] == 'cpu' for p in platforms}) > 1:
        raise SystemExit(f'error: --platforms {text!r}: export for cpu and for accelerators '
                         'separately (their programs differ in the CPU-only options)')
    return platforms


def parse_args(argv=None):
    from lirdrec_jax import bench
    p = argparse.ArgumentParser(prog='python -m lirdrec_jax.lowering',
                                description=__doc__.splitlines()[0])
    p.add_argument('--config', default='lirdrec',
                   help='built-in config name or config file, [:variant] (its first grid point)')
    p.add_argument('--scale', choices=sorted(bench.SCALES), default='tiny')
    p.add_argument('--platforms', default=','.join(EXPORT_PLATFORMS),
                   help='jax.export platforms, comma-separated (default cuda,tpu)')
    p.add_argument('--sweep_points', type=int, default=0,
                   help='also the vmapped programs of this many points (>= 2)')
    p.add_argument('--devices', type=int, default=0, help='0 = all devices')
    args = p.parse_args(argv)
    if args.sweep_points == 1 or args.sweep_points < 0:
        p.error('--sweep_points must be 0 or >= 2')
    return args


def format_line(name: str, platforms: Sequence[str], exported, stats: dict) -> str:
    """One line of the command's table."""
    ok = ','.join(platforms) if exported is not None else 'FAILED'
    size = f'{module_bytes(exported) / 1024:9.1f} KiB' if exported is not None else ' ' * 13
    return (f'{name:18s} {ok:10s} {size}  peak {stats["peak_bytes"] / 2 ** 20:9.2f} MiB  '
            f'{stats["flops"] / 1e9:10.4f} GFLOP')


def main(argv=None) -> int:
    from lirdrec_jax import cli
    args = parse_args(argv)
    platforms = parse_platforms(args.platforms)
    cfg = cli.load_config(args.config)
    target = BACKEND_OF[platforms[0]]
    t = time.perf_counter()
    data = _synthetic_data(point_config(cfg), args.scale)
    partitioner = train.create_partitioner({'num_devices': args.devices,
                                            'shard_items': cfg.parallel.shard_items})
    try:
        progs = programs(cfg, data, partitioner, sweep_points=args.sweep_points,
                         platform=target)
    except ValueError as err:
        raise SystemExit(f'error: {err}')
    ds = data.dataset
    print(f'model {cfg.model_name}; {args.scale} scale synthetic data: {ds.n_users} users, '
          f'{ds.n_items} items; {partitioner.describe()}; programs built for {target} in '
          f'{time.perf_counter() - t:.1f} s; export for {",".join(platforms)}; memory and cost '
          f'from the {jax.default_backend()} compile', flush=True)
    print(f'{"program":18s} {"exported":10s} {"StableHLO":>13s}  {"memory":>19s}  '
          f'{"cost":>16s}')
    failures = []
    for name, program in progs.items():
        try:
            exported = export_program(program, platforms)
        except ExportError as err:
            exported = None
            failures.append(str(err))
        print(format_line(name, platforms, exported, compiled_stats(program)), flush=True)
    if failures:
        print(f'error: {failures[0]}' + (f' (and {len(failures) - 1} more)'
                                          if len(failures) > 1 else ''), file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
