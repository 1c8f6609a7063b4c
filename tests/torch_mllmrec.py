"""An independent PyTorch statement of MLLMRec's math, for tests/test_mllmrec.py and (behind the
reference's interface) tests/test_parity_mllmrec.py.

Written for these tests from the model's equations (lirdrec_jax/models/mllmrec.py's docstring
and docs/reference_quirks.md), not from the reference's code. It deliberately computes things
another way than our code: every graph is a DENSE torch matrix (the Jaccard from a dense
user-count matrix, the top-k by a stable descending sort, the normalisation by broadcasting),
e by dense products, the towers over ALL items and users before the batch rows are gathered,
gradients from torch autograd and the optimiser step from torch.optim.Adam.

Ties of the top-k selections go to the lower item index (a stable sort), the order our code
uses, so that the two agree on tie rows too on small hand-made data.
"""
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def dense_counts(users, items, n_users: int, n_items: int) -> torch.Tensor:
    """(n_items, n_users) float32: how often each (item, user) pair occurs."""
    a = torch.zeros(n_items, n_users, dtype=torch.float32)
    a.index_put_((torch.as_tensor(np.asarray(items), dtype=torch.long),
                  torch.as_tensor(np.asarray(users), dtype=torch.long)),
                 torch.ones(len(users)), accumulate=True)
    return a


def stable_topk_scatter(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries of every row kept (ties: lower column first), the rest 0."""
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    out = torch.zeros_like(values)
    return out.scatter(1, order, values.gather(1, order))


def dense_pure_knn(features: torch.Tensor, knn_k: int, pure: float) -> torch.Tensor:
    """B: top-k cosine neighbours (self included), 1 where the similarity >= pure (both in
    float32), 0 elsewhere."""
    unit = features / features.norm(dim=1, keepdim=True)
    sim = unit @ unit.T
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :knn_k]
    kept = (sim.gather(1, order) >= torch.tensor(pure, dtype=torch.float32)).float()
    return torch.zeros_like(sim).scatter(1, order, kept)


def dense_jaccard(users, items, n_users: int, n_items: int, exact_diagonal: bool = False
                  ) -> torch.Tensor:
    """The float32 Jaccard over training users with the entries equal to 1.0 zeroed (the
    reference's "diagonal" removal, which keeps the self-loop of single-user items);
    `exact_diagonal` zeroes the diagonal itself instead (the must-fail variant)."""
    a = dense_counts(users, items, n_users, n_items)
    inter = a @ a.T
    size = a.sum(1, keepdim=True)
    jac = inter / (size + size.T - inter + 1e-7)
    if exact_diagonal:
        jac.fill_diagonal_(0.0)
    else:
        jac[jac == 1.0] = 0.0
    return jac


def dense_item_graph(features: torch.Tensor, users, items, n_users: int, n_items: int,
                     knn_k: int, knn_jac: int, pure: float,
                     exact_diagonal: bool = False) -> torch.Tensor:
    """S = D^-1/2 (B + J) D^-1/2 with D the row sums (0 where a row sums to 0), float64."""
    b = dense_pure_knn(features, knn_k, pure).double()
    j = stable_topk_scatter(dense_jaccard(users, items, n_users, n_items, exact_diagonal),
                            knn_jac).double()
    m = b + j
    d = m.sum(1).pow(-0.5)
    d[torch.isinf(d)] = 0.0
    return d[:, None] * m * d[None, :]


def dense_item_inputs(s: torch.Tensor, features: torch.Tensor, n_layers: int) -> torch.Tensor:
    """e = sum_{l=0..L} S^l F in float64."""
    layer = features.double()
    total = layer.clone()
    for _ in range(n_layers):
        layer = s.double() @ layer
        total = total + layer
    return total


class TorchMLLMRec(nn.Module):
    """The towers and the BPR loss over given frozen inputs e (items) and P (users).

    `slope` is leaky_relu's negative slope (0.01; 0 is the must-fail relu variant), `reg` an
    extra L2 weight on the batch rows (0; > 0 is the must-fail variant)."""

    def __init__(self, item_inputs: torch.Tensor, user_inputs: torch.Tensor, dim: int,
                 slope: float = 0.01, reg: float = 0.0):
        super().__init__()
        self.item_inputs = item_inputs.float()
        self.user_inputs = user_inputs.float()
        self.MLP = nn.Linear(item_inputs.shape[1], 4 * dim)
        self.MLP_1 = nn.Linear(4 * dim, dim)
        self.MLP_u = nn.Linear(user_inputs.shape[1], 4 * dim)
        self.MLP_u_1 = nn.Linear(4 * dim, dim)
        self.slope, self.reg = slope, reg

    def towers(self):
        h_u = self.MLP_u_1(F.leaky_relu(self.MLP_u(self.user_inputs), self.slope))
        h_i = self.MLP_1(F.leaky_relu(self.MLP(self.item_inputs), self.slope))
        return h_u, h_i

    def loss(self, users, positives, negatives):
        h_u, h_i = self.towers()
        u, p, n = h_u[users], h_i[positives], h_i[negatives]
        margin = (u * p).sum(1) - (u * n).sum(1)
        value = -F.logsigmoid(margin).mean()
        if self.reg:
            value = value + self.reg * (u.pow(2).sum() + p.pow(2).sum()) / len(users)
        return value


class RestatedMLLMRec(TorchMLLMRec):
    """MLLMRec behind the reference's class interface, for the parity machinery: the
    constructor `(config, train_data)` reading both input files from `config['data_path'] +
    config['dataset']` (keys image_text_feature_file, user_preference_feature_file), the
    reference's parameter names (the frozen tables `item_feat_embedding`,
    `user_preference_feat_embedding` included), the sparse `ii_mat` attribute, and the methods
    `pre_epoch_processing()`, `II_GCN(mat, x)`, `forward(adj)`, `calculate_loss(batch)`,
    `full_sort_predict(batch)`. Subclasses set the class attributes to make must-fail variants.
    """
    exact_diagonal = False
    layer_scale = 1.0   # e multiplied by this (0.5 with one layer: the mean over layers)
    slope = 0.01
    reg = 0.0

    def __init__(self, config, train_data):
        folder = config['data_path'] + config['dataset']
        items = np.load(os.path.join(folder, config['image_text_feature_file']))
        users = np.load(os.path.join(folder, config['user_preference_feature_file']))
        items_t = torch.from_numpy(np.asarray(items, np.float32))
        inter = train_data.inter_matrix(form='coo')
        n_users = train_data.dataset.get_user_num()
        n_items = train_data.dataset.get_item_num()
        s = dense_item_graph(items_t, inter.row, inter.col, n_users, n_items, config['knn_k'],
                             config['knn_jac'], config['pure'], self.exact_diagonal)
        self.n_layers = config['n_ii_layers']
        e = self.layer_scale * dense_item_inputs(s, items_t, self.n_layers)
        super().__init__(e, torch.from_numpy(np.asarray(users, np.float32)),
                         config['feat_embed_dim'], self.slope, self.reg)
        self.item_feat_embedding = nn.Embedding.from_pretrained(items_t)
        self.user_preference_feat_embedding = nn.Embedding.from_pretrained(self.user_inputs)
        self.ii_mat = s.float().to_sparse()

    def II_GCN(self, mat, x):
        dense = mat.to_dense().double()
        return self.layer_scale * dense_item_inputs(dense, x, self.n_layers).float()

    def pre_epoch_processing(self):
        pass

    def forward(self, adj=None):
        return self.towers()

    def calculate_loss(self, interaction):
        return self.loss(interaction[0], interaction[1], interaction[2])

    def full_sort_predict(self, interaction):
        h_u, h_i = self.towers()
        return h_u[interaction[0]] @ h_i.T


class ExactDiagonal(RestatedMLLMRec):
    """Wrong: the Jaccard diagonal zeroed exactly, so single-user items lose their self-loop."""
    exact_diagonal = True


class LayerMean(RestatedMLLMRec):
    """Wrong: e averaged over the layers 0..L instead of summed."""
    layer_scale = 0.5


class Relu(RestatedMLLMRec):
    """Wrong: relu instead of leaky_relu in the towers."""
    slope = 0.0


class WithL2(RestatedMLLMRec):
    """Wrong: an L2 term on the batch's user and positive rows (the reference has none)."""
    reg = 1e-2
