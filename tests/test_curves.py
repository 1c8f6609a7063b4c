"""TensorBoard curves: the event files read back (with a reader of the TFRecord format written
here, not tensorboardX's writer) hold exactly the epochs and numbers of metrics.jsonl."""
import json
import shutil
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from configs import test as test_config
from lirdrec_jax import curves, experiment
from tests.conftest import write_small_dataset

EPOCHS = 4


def read_events(path) -> list:
    """(step, tag, value) of every scalar in a TFRecord event file: records of a little-endian
    uint64 length, its uint32 CRC, the serialized Event and the Event's uint32 CRC."""
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack('<Q', data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            out.append((event.step, value.tag, value.simple_value))
    assert pos == len(data)
    return out


def scalars_of_point(point_dir) -> dict:
    files = sorted(point_dir.glob(curves.EVENT_FILE_GLOB))
    assert len(files) == 1, files
    found = {}
    for step, tag, value in read_events(files[0]):
        assert (tag, step) not in found, f'{tag} at epoch {step} twice'
        found[tag, step] = value
    return found


def expected_from_metrics(point_dir) -> dict:
    """The same scalars computed from metrics.jsonl by hand."""
    expected = {}
    for line in (point_dir / 'metrics.jsonl').read_text().splitlines():
        r = json.loads(line)
        e = r['epoch']
        expected['train/loss', e] = r['loss']
        expected['train/learning_rate', e] = r['learning_rate']
        expected['train/seconds', e] = r['train_seconds']
        for split in ('valid', 'test'):
            for name, value in r.get(split, {}).items():
                expected[f'{split}/{name.replace("@", "_at_")}', e] = value
        if 'eval_seconds' in r:
            expected['eval/seconds', e] = r['eval_seconds']
        # LIRDRec's host state: the PWC weights of the epoch.
        for name in ('w1', 'w2'):
            if name in r:
                expected[f'model/{name}', e] = r[name]
    return expected


def assert_same(found: dict, expected: dict) -> None:
    assert sorted(found) == sorted(expected)
    keys = sorted(expected)
    # Event files store float32.
    np.testing.assert_allclose([found[k] for k in keys], [expected[k] for k in keys],
                               rtol=1e-6, atol=0)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_small_dataset(tmp_path_factory.mktemp('data'))


def config(data_dir, out_dir, **checkpoint):
    cfg = test_config.get_config()
    cfg.data.data_dir, cfg.data.dataset = str(data_dir), 'small'
    cfg.checkpoint.output_dir, cfg.checkpoint.run_name = str(out_dir), 'run'
    cfg.train.epochs, cfg.train.stopping_step, cfg.train.eval_step = EPOCHS, 100, 2
    cfg.optim.learning_rate = (0.005, 0.01)
    cfg.hyper_parameters = ('optim.learning_rate',)
    for key, value in checkpoint.items():
        cfg.checkpoint[key] = value
    return cfg


def test_record_scalars_hand_example():
    record = {'epoch': 3, 'loss': 2.5, 'learning_rate': 1e-3, 'w1': 0.81, 'w2': 0.19,
              'train_seconds': 1.25, 'valid': {'recall@20': 0.5}, 'test': {'recall@20': 0.25},
              'eval_seconds': 0.5, 'note': 'text', 'flag': True}
    assert curves.record_scalars(record) == [
        ('train/loss', 2.5), ('train/learning_rate', 1e-3), ('train/seconds', 1.25),
        ('valid/recall_at_20', 0.5), ('test/recall_at_20', 0.25), ('eval/seconds', 0.5),
        ('model/w1', 0.81), ('model/w2', 0.19)]


def test_event_files_hold_the_epochs_of_metrics_jsonl_after_a_resume(data_dir, tmp_path):
    """A grid of two points, interrupted after 2 of 4 epochs, then resumed; a stale event
    file (epochs trained after the last checkpoint by a killed run) is replaced."""
    cfg = config(data_dir, tmp_path)
    experiment.run(cfg, stop_after_epochs=2)
    run_dir = tmp_path / 'run'
    for point in ('point-000', 'point-001'):
        point_dir = run_dir / point
        assert_same(scalars_of_point(point_dir), expected_from_metrics(point_dir))
    # A killed run's extra epoch 2 in a second event file of point 0.
    stale_dir = tmp_path / 'stale'
    stale = curves.PointCurves(stale_dir, enabled=True)
    stale.restart([{'epoch': 2, 'loss': 99.0, 'learning_rate': 1.0, 'train_seconds': 1.0}])
    stale.close()
    for path in stale_dir.glob(curves.EVENT_FILE_GLOB):
        shutil.move(path, run_dir / 'point-000' / (path.name + '.killed'))
    cfg.resume = True
    experiment.run(cfg)
    for point in ('point-000', 'point-001'):
        point_dir = run_dir / point
        found, expected = scalars_of_point(point_dir), expected_from_metrics(point_dir)
        assert_same(found, expected)
        assert sorted({step for _, step in found}) == list(range(EPOCHS))
        # Evaluated epochs only (eval_step 2): 1 and 3.
        assert sorted(s for tag, s in found if tag == 'valid/recall_at_20') == [1, 3]
        assert ('model/w1', 0) in found


def test_tensorboard_off_writes_no_event_files(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, tensorboard=False)
    cfg.optim.learning_rate = (0.005,)
    cfg.train.epochs = 1
    experiment.run(cfg)
    assert (tmp_path / 'run' / 'point-000' / 'metrics.jsonl').exists()
    assert not list((tmp_path / 'run').rglob('events.out.tfevents.*'))
