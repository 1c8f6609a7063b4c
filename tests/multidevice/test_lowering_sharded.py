"""Every program of every model, built for GPU with the items split over all the devices of
the process (8 simulated ones in tests/test_multidevice.py's 8-device run), exports for GPU and
TPU (`lirdrec_jax.lowering`), and the exported modules keep the placement the trainer gives
their arguments: a mesh of all the devices, the item-split arrays and the batches split over it,
and the ranking of evaluation users one block per device."""
import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lirdrec_jax import bench, cli, grid, lowering, models, parallel, train

N_DEV = jax.device_count()
PLATFORMS = ('cuda', 'tpu')
# 42 items and 34 rows per batch: multiples of neither 4 nor 8 devices, so the item-split
# arrays and the batches are padded (on 8 devices to 48 items and 40 rows).
N_USERS, N_ITEMS, BATCH, EVAL_BATCH = 60, 42, 34, 16
PADDED_ITEMS = -(-N_ITEMS // N_DEV) * N_DEV
PADDED_BATCH = -(-BATCH // N_DEV) * N_DEV
# The models whose frozen item features are split by item (`Partitioner.split_items` in their
# `place_frozen`); every array of the others is replicated (their `create` docstrings).
SPLITS_ITEMS = ('cm3', 'lirdrec')


def small_config(name: str):
    """The model's built-in config, first grid point, with small widths and batches (as in
    tests/test_lowering.py)."""
    cfg = grid.expand_grid(cli.load_config(name))[0].config
    for width in ('embedding_size', 'feat_embed_dim'):
        if width in cfg.model:
            cfg.model[width] = 8
    cfg.train.batch_size = BATCH
    cfg.eval.topk, cfg.eval.valid_metric, cfg.eval.batch_size = (5, 10), 'recall@10', EVAL_BATCH
    return cfg


@functools.lru_cache(maxsize=None)
def small_data(name: str) -> train.PreparedData:
    dataset = bench.synthetic_dataset(N_USERS, N_ITEMS, 500, image_dim=24, text_dim=12,
                                      name='tiny', input_files=models.get_model(name).input_files)
    return train.prepare_data(dataset, name)


def spec_of(x) -> P:
    """The partition spec an argument is placed with (a scalar left on one device: none)."""
    sharding = getattr(x, 'sharding', None)
    return sharding.spec if isinstance(sharding, NamedSharding) else P()


def split_axis(x):
    """The axis `x` is split along over the devices, or None (replicated)."""
    axes = [i for i, name in enumerate(spec_of(x)) if name is not None]
    assert len(axes) <= 1, spec_of(x)
    return axes[0] if axes else None


def manual_block_types(module: str) -> list:
    """The types of the per-device block arguments of the module's (one) shard_map body."""
    heads = re.findall(r'sdy\.manual_computation\(.*manual_axes=\{"devices"\} \((.*?)\) \{',
                       module)
    assert len(heads) == 1, len(heads)
    return re.findall(r'tensor<([^>]*)>', heads[0])


def tensor_type(shape, dtype) -> str:
    """'48x24xf32'-style StableHLO type of a shape and a numpy dtype."""
    short = {'float32': 'f32', 'int32': 'i32', 'bfloat16': 'bf16', 'uint32': 'ui32'}
    return 'x'.join([*map(str, shape), short[jnp.dtype(dtype).name]])


@pytest.mark.parametrize('name', sorted(models.REGISTRY))
def test_every_program_exports_with_its_arguments_split_over_the_devices(name):
    assert N_DEV >= 4, 'XLA_FLAGS=--xla_force_host_platform_device_count was not applied'
    partitioner = train.create_partitioner({'num_devices': N_DEV, 'shard_items': True})
    progs = lowering.programs(small_config(name), small_data(name), partitioner,
                              sweep_points=2, platform='gpu')
    exported = lowering.export_all(progs, PLATFORMS)
    assert set(exported) == set(progs) and 'sweep_epoch' in progs and 'eval_topk' in progs

    item_split = {}
    for program_name, program in progs.items():
        e = exported[program_name]
        assert e.platforms == PLATFORMS and e.nr_devices == N_DEV, program_name
        module = e.mlir_module()
        assert f'sdy.mesh @mesh = <["{parallel.AXIS}"={N_DEV}]>' in module, program_name
        leaves = jax.tree.leaves(program.args)
        # The module's argument shardings (`in_shardings_hlo` is no longer filled in by this
        # JAX's export: all None), on the mesh of this run.
        shardings = e.in_shardings_jax(partitioner.mesh)
        for i in e.module_kept_var_idx:  # the arguments the module reads
            x = leaves[i]
            assert shardings[i].is_equivalent_to(NamedSharding(partitioner.mesh, spec_of(x)),
                                                 x.ndim), (program_name, i, x.shape)
            axis = split_axis(x)
            if axis is not None:
                assert x.shape[axis] % N_DEV == 0, (program_name, x.shape)
                if x.shape[axis] == PADDED_ITEMS:
                    item_split.setdefault(program_name, []).append(x.shape)

    # The training programs read the item-split features.
    training = {'train_step', 'train_epoch', 'sweep_step', 'sweep_epoch'}
    if name in SPLITS_ITEMS:
        assert training <= set(item_split), sorted(item_split)
    else:
        assert not item_split, item_split
    # Batches: their rows split over the devices (BPR rows or users, padded).
    batch = jax.tree.leaves(progs['train_step'].args[1])
    assert batch and all(split_axis(b) == 0 and b.shape[0] == PADDED_BATCH for b in batch), \
        [(b.shape, spec_of(b)) for b in batch]

    # eval_topk: the users (flat), then the masking rows and columns, one block per device;
    # the shard_map body ranks one block, EVAL_BATCH users, on each device.
    *_, users, rows, cols = progs['eval_topk'].args
    assert users.shape == (N_DEV * EVAL_BATCH,) and rows.shape[0] == cols.shape[0] == N_DEV
    for x in (users, rows, cols):
        assert split_axis(x) == 0
    blocks = manual_block_types(exported['eval_topk'].mlir_module())
    assert blocks[-3:] == [tensor_type((EVAL_BATCH,), users.dtype),
                           tensor_type((1,) + rows.shape[1:], rows.dtype),
                           tensor_type((1,) + cols.shape[1:], cols.dtype)]
