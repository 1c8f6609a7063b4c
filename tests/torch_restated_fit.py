"""MMRec's training to early stopping, restated for the end-to-end tests
(tests/test_parity_full.py): a training data loader with its own shuffling and negative
sampling on the global generators, and a trainer with `fit`.

Written from the framework's documented behaviour, with its interface (the names that
`lirdrec_jax.parity.full.fit_reference` drives and reads): the loader's `pretrain_setup()` and
iteration over (3, batch) LongTensors of (users, positives, negatives); the trainer's
`fit(train, valid_data=, test_data=, saved=)` and its state `train_loss_dict`, `cur_step`,
`eval_step`, `best_valid_result`, `best_test_upon_valid`.
"""
import random

import numpy as np
import torch

from lirdrec_jax.parity import reference
from tests.torch_restatement import RestatedTrainer


class RestatedTrainLoader(reference.ReferenceTrainData):
    """Each pass: the training rows in a new order (NumPy's global generator), in batches, each
    row with one negative drawn uniformly (Python's `random`) from the items seen in training,
    redrawn while it is one of the user's training items."""

    def __init__(self, dataset, batch_size: int):
        super().__init__(dataset)
        self.batch_size = batch_size
        self.users = dataset.train.users.astype(np.int64)
        self.items = dataset.train.items.astype(np.int64)
        self.candidates = sorted(set(self.items.tolist()))
        self.seen = {}
        for u, i in zip(self.users.tolist(), self.items.tolist()):
            self.seen.setdefault(u, set()).add(i)

    def pretrain_setup(self):
        self.candidates = sorted(self.candidates)
        random.shuffle(self.candidates)

    def _negative(self, user: int) -> int:
        item = random.choice(self.candidates)
        while item in self.seen[user]:
            item = random.choice(self.candidates)
        return item

    def __iter__(self):
        order = np.random.permutation(self.users.size)
        for start in range(0, order.size, self.batch_size):
            rows = order[start:start + self.batch_size]
            negatives = [self._negative(u) for u in self.users[rows].tolist()]
            yield torch.from_numpy(np.stack([self.users[rows], self.items[rows],
                                             np.asarray(negatives, np.int64)]))


def restated_loaders(config, dataset):
    """(train, valid, test) over our splits, in place of the reference's loaders."""
    return (RestatedTrainLoader(dataset, config['train_batch_size']),
            reference.ReferenceEvalData(dataset_split(dataset, 'valid'),
                                        config['eval_batch_size']),
            reference.ReferenceEvalData(dataset_split(dataset, 'test'),
                                        config['eval_batch_size']))


def dataset_split(dataset, name: str):
    from lirdrec_jax import evaluation
    split = getattr(dataset, name)
    return evaluation.build_eval_split(split.users, split.items, dataset.train.users,
                                       dataset.train.items)


class FittingTrainer(RestatedTrainer):
    """`RestatedTrainer` with MMRec's `fit`: every epoch the model's `pre_epoch_processing`, an
    epoch of Adam steps and a scheduler step; every `eval_step` epochs the valid metric, where a
    strictly larger value is the new best and otherwise counts one stale evaluation, training
    stopping once more than `stopping_step` evaluations in a row were stale; the test metrics of
    the best valid evaluation are kept. Also records `best_epoch` (the framework does not)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.epochs, self.eval_step = config['epochs'], min(config['eval_step'], config['epochs'])
        self.stopping_step = config['stopping_step']
        self.valid_metric = config['valid_metric'].lower()
        self.train_loss_dict, self.cur_step, self.best_valid_score = {}, 0, -1.0
        self.best_valid_result = self.best_test_upon_valid = None
        self.best_epoch = -1

    def fit(self, train_data, valid_data=None, test_data=None, saved=False):
        del saved
        for epoch in range(self.epochs):
            self.model.pre_epoch_processing()
            self.train_loss_dict[epoch], _ = self._train_epoch(train_data, epoch)
            self.lr_scheduler.step()
            if (epoch + 1) % self.eval_step:
                continue
            valid = self.evaluate(valid_data)
            test = self.evaluate(test_data)
            if valid[self.valid_metric] > self.best_valid_score:
                self.best_valid_score, self.cur_step, self.best_epoch = (
                    valid[self.valid_metric], 0, epoch)
                self.best_valid_result, self.best_test_upon_valid = valid, test
            else:
                self.cur_step += 1
                if self.cur_step > self.stopping_step:
                    break
        return self.best_valid_score, self.best_valid_result, self.best_test_upon_valid
