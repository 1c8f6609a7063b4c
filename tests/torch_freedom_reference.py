"""FREEDOM restated in PyTorch with the reference's class INTERFACE, for the parity tests
(tests/test_parity_freedom.py).

The math is tests/torch_freedom.py's (dense graphs built from counts, written from the model's
equations, not from the reference's code); this module only puts it behind the interface that
the parity machinery drives: the constructor `(config, train_data)` reading the features from
`config['data_path'] + config['dataset']`, the parameter names of the reference's state_dict,
the attributes `norm_adj`, `mm_adj`, `edge_indices`, `edge_values`, `masked_adj` (sparse torch
tensors), and the methods `pre_epoch_processing()`, `forward(adj)`, `calculate_loss(batch)`,
`full_sort_predict(batch)`. The trainer is tests/torch_restatement.py's `RestatedTrainer`.

Where it differs from our JAX code on purpose: dense algebra everywhere (sparse tensors only at
the interface, built coalesced from dense matrices), the feature projections over the whole
table, the pruning draw as an exponential race (top-n of w / Exp(1), sequential weighted
sampling without replacement) on torch's generator, torch autograd and torch.optim.Adam.
"""
import os

import numpy as np
import torch

from tests import torch_freedom as T


def _features(config, key: str):
    path = os.path.join(config['data_path'] + config['dataset'], config[key] or '')
    return np.load(path).astype(np.float32) if os.path.isfile(path) else None


class RestatedFREEDOM(T.TorchFREEDOM):
    """FREEDOM behind the reference's interface. Subclasses override one piece to make a
    must-fail variant (`layer_mean`, `full_adjacency`, `prune_graph`)."""
    layer_mean = True

    def __init__(self, config, train_data):
        n_users = train_data.dataset.get_user_num()
        n_items = train_data.dataset.get_item_num()
        image = _features(config, 'vision_feature_file')
        text = _features(config, 'text_feature_file')
        super().__init__(n_users, n_items, config['embedding_size'], config['n_ui_layers'],
                         config['n_mm_layers'], image, text, config['knn_k'],
                         config['mm_image_weight'], config['reg_weight'],
                         layer_mean=self.layer_mean)
        self.dropout = config['dropout']
        inter = train_data.inter_matrix(form='coo')
        # The edges are the distinct (user, item) pairs in (user, item) order (a COO matrix
        # converted to another dtype sums its duplicates and sorts its entries).
        pairs = np.array(sorted(set(zip(np.asarray(inter.row).tolist(),
                                        np.asarray(inter.col).tolist()))), np.int64)
        users, items = pairs[:, 0], pairs[:, 1]
        self.train_users, self.train_items = users, items
        self.edge_indices = torch.tensor(np.stack([users, items]), dtype=torch.long)
        self.edge_values = T.sampling_weights(users, items, n_users, n_items).float()
        self.norm_adj = self.full_adjacency(users, items).to_sparse()
        self.mm_adj = self.item_graph.to_sparse()
        self.masked_adj = None

    def full_adjacency(self, users, items) -> torch.Tensor:
        """The dense full normalised adjacency (float32)."""
        return T.dense_norm_adjacency(users, items, self.n_users, self.n_items)

    def prune_graph(self, kept_users, kept_items) -> torch.Tensor:
        """The dense pruned adjacency of the kept edges (float32)."""
        return T.dense_pruned_adjacency(kept_users, kept_items, self.n_users, self.n_items)

    def pre_epoch_processing(self):
        if self.dropout <= 0:
            self.masked_adj = self.norm_adj
            return
        n = self.edge_values.numel()
        keep = int(n * (1.0 - self.dropout))
        race = torch.empty(n, dtype=torch.float64).exponential_() / self.edge_values.double()
        chosen = torch.topk(race, keep, largest=False).indices.numpy()
        self.masked_adj = self.prune_graph(self.train_users[chosen],
                                           self.train_items[chosen]).to_sparse()

    def calculate_loss(self, interaction):
        return self.loss(self.masked_adj, interaction[0], interaction[1], interaction[2])

    def full_sort_predict(self, interaction):
        users, items = self.forward(self.norm_adj)
        return users[interaction[0]] @ items.T


class SumOverLayers(RestatedFREEDOM):
    """Wrong: LightGCN's layers summed instead of averaged."""
    layer_mean = False


class RowNormalised(RestatedFREEDOM):
    """Wrong: the full adjacency normalised D^-1 A instead of D^-1/2 A D^-1/2."""

    def full_adjacency(self, users, items):
        binary = (T.dense_norm_adjacency(users, items, self.n_users, self.n_items) > 0).double()
        return (binary / (binary.sum(1, keepdim=True) + T.EPS)).float()


class FullDegreePruning(RestatedFREEDOM):
    """Wrong: the kept edges renormalised with the FULL graph's degrees, not their own."""

    def prune_graph(self, kept_users, kept_items):
        counts = T.edge_counts(self.train_users, self.train_items, self.n_users, self.n_items)
        du, di = counts.sum(1) + T.EPS, counts.sum(0) + T.EPS
        kept = T.edge_counts(kept_users, kept_items, self.n_users, self.n_items)
        v = du.pow(-0.5)[:, None] * kept * di.pow(-0.5)[None, :]
        n = self.n_users + self.n_items
        out = torch.zeros(n, n, dtype=torch.float64)
        out[:self.n_users, self.n_users:] = v
        out[self.n_users:, :self.n_users] = v.T
        return out.float()


class FrozenImageTable(RestatedFREEDOM):
    """Wrong: the image feature table frozen (the reference trains it)."""

    def __init__(self, config, train_data):
        super().__init__(config, train_data)
        self.image_embedding.weight.requires_grad_(False)
