"""An independent PyTorch statement of FREEDOM's math, for tests/test_freedom.py.

Written for these tests from the model's equations (see lirdrec_jax/models/freedom.py's
docstring), not from the reference's code. It deliberately computes things another way than
our JAX code: every graph is a DENSE torch matrix built from counts (no sparse products, no
segment sums), the kNN graph comes from torch.topk, the feature projections run over the whole
table before the rows are gathered (as the reference does; ours gathers first), gradients come
from torch autograd and the optimiser step from torch.optim.Adam.

The edge sample of the pruned graph is an input (`kept_users`, `kept_items`), so that both
sides use the same edges: the sampler itself is tested separately against numpy.
"""
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

EPS = 1e-7  # added to every degree before the inverse square root


def dense_norm_adjacency(users: Sequence[int], items: Sequence[int], n_users: int,
                         n_items: int) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the binary bipartite graph (repeated pairs count once)."""
    n = n_users + n_items
    a = torch.zeros(n, n, dtype=torch.float64)
    u = torch.tensor(np.asarray(users), dtype=torch.long)
    i = torch.tensor(np.asarray(items), dtype=torch.long) + n_users
    a[u, i] = 1.0
    a[i, u] = 1.0
    scale = (a.sum(1) + EPS).pow(-0.5)
    return (scale[:, None] * a * scale[None, :]).float()


def edge_counts(users, items, n_users: int, n_items: int) -> torch.Tensor:
    """(U, I) float64: how many times each pair occurs in the edge list."""
    c = torch.zeros(n_users, n_items, dtype=torch.float64)
    c.index_put_((torch.tensor(np.asarray(users), dtype=torch.long),
                  torch.tensor(np.asarray(items), dtype=torch.long)),
                 torch.ones(len(users), dtype=torch.float64), accumulate=True)
    return c


def sampling_weights(users, items, n_users: int, n_items: int) -> torch.Tensor:
    """1/sqrt(d_u d_i) for each distinct (user, item) pair in (user, item) order, degrees
    counting distinct pairs (repeated rows once)."""
    c = (edge_counts(users, items, n_users, n_items) > 0).double()
    du, di = c.sum(1) + EPS, c.sum(0) + EPS
    u, i = torch.nonzero(c, as_tuple=True)  # row-major: sorted by (user, item)
    return du[u].pow(-0.5) * di[i].pow(-0.5)


def dense_pruned_adjacency(kept_users, kept_items, n_users: int, n_items: int) -> torch.Tensor:
    """The kept edges renormalised with their OWN degrees, mirrored: [[0, V], [V^T, 0]] with
    V = D_u^-1/2 C D_i^-1/2, C the kept edge counts (a pair kept twice counts twice)."""
    c = edge_counts(kept_users, kept_items, n_users, n_items)
    du, di = c.sum(1) + EPS, c.sum(0) + EPS
    v = du.pow(-0.5)[:, None] * c * di.pow(-0.5)[None, :]
    n = n_users + n_items
    out = torch.zeros(n, n, dtype=torch.float64)
    out[:n_users, n_users:] = v
    out[n_users:, :n_users] = v.T
    return out.float()


def dense_knn_graph(x: torch.Tensor, k: int) -> torch.Tensor:
    """Binary top-k cosine graph (self included), entry (i, j) scaled by 1/sqrt(r_i r_j) with
    r the row sums (every row has k entries)."""
    unit = x / x.norm(dim=1, keepdim=True)
    neighbours = torch.topk(unit @ unit.T, k, dim=1).indices
    b = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64)
    b.scatter_(1, neighbours, 1.0)
    scale = (b.sum(1) + EPS).pow(-0.5)
    return scale[:, None] * b * scale[None, :]


class TorchFREEDOM(nn.Module):
    """FREEDOM with dense graphs. `layer_mean=False` sums the layers instead (the must-fail
    variant of the tests)."""

    def __init__(self, n_users: int, n_items: int, dim: int, n_ui_layers: int, n_mm_layers: int,
                 image: Optional[np.ndarray], text: Optional[np.ndarray], knn_k: int,
                 mm_image_weight: float, reg_weight: float, layer_mean: bool = True):
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.n_ui_layers, self.n_mm_layers = n_ui_layers, n_mm_layers
        self.reg_weight, self.layer_mean = reg_weight, layer_mean
        self.user_embedding = nn.Embedding(n_users, dim)
        self.item_id_embedding = nn.Embedding(n_items, dim)
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_id_embedding.weight)
        graphs = []
        for name, feat in (('image', image), ('text', text)):
            if feat is None:
                continue
            table = torch.tensor(np.asarray(feat), dtype=torch.float32)
            setattr(self, f'{name}_embedding', nn.Embedding.from_pretrained(table, freeze=False))
            setattr(self, f'{name}_trs', nn.Linear(table.shape[1], dim))
            graphs.append(dense_knn_graph(table.double(), knn_k))
        if len(graphs) == 2:
            item_graph = mm_image_weight * graphs[0] + (1.0 - mm_image_weight) * graphs[1]
        else:
            item_graph = graphs[0]
        self.item_graph = item_graph.float()
        self.modalities = [m for m, f in (('text', text), ('image', image)) if f is not None]

    def forward(self, adj: torch.Tensor):
        h = self.item_id_embedding.weight
        for _ in range(self.n_mm_layers):
            h = self.item_graph @ h
        x = torch.cat([self.user_embedding.weight, self.item_id_embedding.weight], 0)
        layers = [x]
        for _ in range(self.n_ui_layers):
            layers.append(adj @ layers[-1])
        stacked = torch.stack(layers, 0)
        total = stacked.mean(0) if self.layer_mean else stacked.sum(0)
        return total[:self.n_users], total[self.n_users:] + h

    @staticmethod
    def bpr(u, p, n):
        return -nn.functional.logsigmoid((u * p).sum(1) - (u * n).sum(1)).mean()

    def loss(self, adj: torch.Tensor, users, positives, negatives) -> torch.Tensor:
        ua, ia = self.forward(adj)
        u = ua[users]
        total = self.bpr(u, ia[positives], ia[negatives])
        aux = 0.0
        for m in self.modalities:
            projected = getattr(self, f'{m}_trs')(getattr(self, f'{m}_embedding').weight)
            aux = aux + self.bpr(u, projected[positives], projected[negatives])
        return total + self.reg_weight * aux

    def load_params(self, params: dict) -> None:
        """Copy our parameter dict in (Flax kernels are the transposed Linear weights)."""
        with torch.no_grad():
            for key, value in named_tensors(self).items():
                value.copy_(torch.tensor(to_torch_layout(params, key)))


def named_tensors(model: TorchFREEDOM) -> dict:
    """Our parameter path (as 'a/b') -> the torch tensor holding it."""
    out = {'user_embedding': model.user_embedding.weight,
           'item_id_embedding': model.item_id_embedding.weight}
    for m in ('image', 'text'):
        if hasattr(model, f'{m}_embedding'):
            out[f'{m}_embedding'] = getattr(model, f'{m}_embedding').weight
            out[f'{m}_trs/kernel'] = getattr(model, f'{m}_trs').weight
            out[f'{m}_trs/bias'] = getattr(model, f'{m}_trs').bias
    return out


def to_torch_layout(params: dict, key: str) -> np.ndarray:
    value = params
    for part in key.split('/'):
        value = value[part]
    value = np.asarray(value, np.float32)
    return value.T.copy() if key.endswith('kernel') else value


def from_torch_layout(tensor: torch.Tensor, key: str) -> np.ndarray:
    value = tensor.detach().numpy()
    return value.T if key.endswith('kernel') else value
