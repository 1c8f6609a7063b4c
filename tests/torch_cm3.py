"""An independent PyTorch statement of CM3 with the reference's interface, for tests/test_cm3.py
and tests/test_parity_cm3.py.

Written for these tests from the model's equations (lirdrec_jax/models/cm3.py's docstring and
the paper), not from the reference's code, and computed another way than our JAX code: dense
torch graphs built from counts (tests/torch_freedom.py's), the kNN graph from torch.topk,
pairwise distances from explicit (B, B, d) differences and the pairs enumerated with
torch.triu_indices (no Gram matrices, no masks: the padding rows of our batches are simply not
there, as in the reference's shorter last batch), the mixing weights drawn with
torch.distributions.Beta (so that the parity command's recording and replay of the reference's
draws applies to it), torch autograd and torch.optim.Adam.

`RestatedCM3` has the reference's interface: the constructor `(config, train_data)` reading the
features from `config['data_path'] + config['dataset']`, the reference's parameter names
(including its never-read feature copies `image_embedding`/`text_embedding`, and
`result_embed` registered as a Parameter, so that it runs on a CPU only with the parity
module's shim, as the reference), the attributes `norm_adj`, `mm_adj`, `masked_adj`, `v_feat`,
`t_feat`, `result_embed`, and `pre_epoch_processing()`, `forward(adj)`,
`calculate_loss(batch)`, `full_sort_predict(batch)`. Like the reference it has no guard for
parallel projections: its slerp is NaN there. Subclasses change one piece each (the must-fail
statements).
"""
import os

import numpy as np
import torch
from torch import nn

from tests import torch_freedom as TF


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def slerp(p_text: torch.Tensor, p_image: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """sin(lam th)/sin th p_text + sin((1-lam) th)/sin th p_image, th the angle between the
    unit rows; no guard (0/0 = NaN for parallel rows)."""
    angle = torch.acos((p_text * p_image).sum(1).clamp(-1.0, 1.0))
    a = torch.sin(lam * angle) / torch.sin(angle)
    b = torch.sin((1.0 - lam) * angle) / torch.sin(angle)
    return a[:, None] * p_text + b[:, None] * p_image


def pair_terms(x: torch.Tensor) -> torch.Tensor:
    """||x_j - x_k||^2 for j < k, from explicit differences, in row-major order."""
    j, k = torch.triu_indices(x.shape[0], x.shape[0], 1)
    return ((x[j] - x[k]) ** 2).sum(1)


def uniformity(x: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    return torch.exp(-t * pair_terms(x)).mean().log()


def calibrated_uniformity(x: torch.Tensor, sim_pairs: torch.Tensor, t: float = 2.0):
    return torch.exp(-t * (pair_terms(x) - 2.0 + 2.0 * sim_pairs)).mean().log()


def pair_similarities(mix: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """clamp(cos(mix_j, mix_k), lo, hi) for j < k."""
    j, k = torch.triu_indices(mix.shape[0], mix.shape[0], 1)
    u = unit(mix)
    return ((u[j] * u[k]).sum(1)).clamp(lo, hi)


def _features(config, key: str) -> np.ndarray:
    path = os.path.join(config['data_path'] + config['dataset'], config[key])
    return np.load(path).astype(np.float32)


def _xavier(*shape) -> nn.Parameter:
    return nn.Parameter(nn.init.xavier_normal_(torch.empty(*shape)))


class RestatedCM3(nn.Module):
    """CM3 behind the reference's interface (module docstring)."""

    def __init__(self, config, train_data):
        super().__init__()
        self.n_users = train_data.dataset.get_user_num()
        self.n_items = train_data.dataset.get_item_num()
        d = config['embedding_size']
        self.dim = d
        self.gamma, self.alpha = config['gamma'], config['alpha']
        self.min_sim, self.max_sim = config['min_sim'], config['max_sim']
        self.n_ui_layers, self.n_mm_layers = config['n_ui_layers'], config['n_mm_layers']
        v = _features(config, 'vision_feature_file')
        t = _features(config, 'text_feature_file')
        self.v_feat, self.t_feat = torch.tensor(v), torch.tensor(t)
        self.theta = _xavier(self.n_users, 3, 1)
        self.v_preference = _xavier(self.n_users, d)
        self.t_preference = _xavier(self.n_users, d)
        self.id_preference = _xavier(self.n_users, d)
        self.image_embedding = nn.Embedding.from_pretrained(self.v_feat.clone(), freeze=False)
        self.text_embedding = nn.Embedding.from_pretrained(self.t_feat.clone(), freeze=False)
        self.v_MLP, self.v_MLP_1 = nn.Linear(v.shape[1], 4 * d), nn.Linear(4 * d, d, bias=False)
        self.t_MLP, self.t_MLP_1 = nn.Linear(t.shape[1], 4 * d), nn.Linear(4 * d, d, bias=False)
        self.text_nn, self.image_nn = nn.Linear(t.shape[1], d), nn.Linear(v.shape[1], d)
        nn.init.xavier_normal_(self.text_nn.weight)
        nn.init.xavier_normal_(self.image_nn.weight)
        # Registered, as in the reference: the assignment in forward() then fails on a CPU.
        self.result_embed = nn.Parameter(torch.zeros(self.n_users + self.n_items, d,
                                                     dtype=torch.float64))
        inter = train_data.inter_matrix(form='coo')
        self.norm_adj = TF.dense_norm_adjacency(inter.row, inter.col, self.n_users,
                                                self.n_items).to_sparse()
        w = config['mm_image_weight']
        knn = (w * TF.dense_knn_graph(self.v_feat.double(), config['knn_k'])
               + (1.0 - w) * TF.dense_knn_graph(self.t_feat.double(), config['knn_k']))
        self.mm_adj = knn.float().to_sparse()
        self.masked_adj = None

    def pre_epoch_processing(self):
        self.masked_adj = self.norm_adj

    def draw_mix_weights(self) -> torch.Tensor:
        return torch.distributions.Beta(self.alpha, self.alpha).sample((self.n_items,))

    def mix(self, lam: torch.Tensor) -> torch.Tensor:
        return slerp(unit(self.text_nn(self.t_feat)), unit(self.image_nn(self.v_feat)), lam)

    def propagate(self, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        layers = [x]
        for _ in range(self.n_ui_layers):
            layers.append(adj @ layers[-1])
        return torch.stack(layers).sum(0)

    def forward(self, adj):
        adj = adj.to_dense()
        leaky = nn.functional.leaky_relu
        f_v = self.v_MLP_1(leaky(self.v_MLP(self.v_feat)))
        f_t = self.t_MLP_1(leaky(self.t_MLP(self.t_feat)))
        mix = self.mix(self.draw_mix_weights())
        x = torch.cat([unit(torch.cat([p, f], 0)) for p, f in
                       ((self.v_preference, f_v), (self.t_preference, f_t),
                        (self.id_preference, mix))], 1)
        rep = self.propagate(adj, x)
        users, items = rep[:self.n_users], rep[self.n_users:]
        att = torch.softmax(self.theta, dim=1)
        d = self.dim
        users = torch.cat([att[:, i] * users[:, i * d:(i + 1) * d] for i in range(3)], 1)
        h = items
        for _ in range(self.n_mm_layers):
            h = self.mm_adj.to_dense() @ h
        items = items + h
        self.result_embed = torch.cat([users, items], 0)
        return unit(users), unit(items), mix

    def similarities(self, mix_negatives: torch.Tensor) -> torch.Tensor:
        return pair_similarities(mix_negatives, self.min_sim, self.max_sim)

    def calculate_loss(self, interaction):
        users, pos, neg = interaction[0], interaction[1], interaction[2]
        u_all, i_all, mix = self.forward(self.masked_adj)
        u, p, n = u_all[users], i_all[pos], i_all[neg]
        align = ((u - p) ** 2).sum(1).mean()
        uniform = uniformity(u) + calibrated_uniformity(n, self.similarities(mix[neg]))
        return align + self.gamma * uniform / 2.0

    def full_sort_predict(self, interaction):
        users = self.result_embed[:self.n_users][interaction[0]]
        return users @ self.result_embed[self.n_users:].T


class LinearMix(RestatedCM3):
    """Wrong: a linear interpolation instead of the spherical one."""

    def mix(self, lam):
        p_t, p_v = unit(self.text_nn(self.t_feat)), unit(self.image_nn(self.v_feat))
        return lam[:, None] * p_t + (1.0 - lam[:, None]) * p_v


class Unclamped(RestatedCM3):
    """Wrong: the negatives' similarities not clamped to [min_sim, max_sim]."""

    def similarities(self, mix_negatives):
        return pair_similarities(mix_negatives, -2.0, 2.0)


class DetachedSimilarity(RestatedCM3):
    """Wrong: no gradient through the similarities s_jk."""

    def similarities(self, mix_negatives):
        return super().similarities(mix_negatives).detach()


class UniqueUsers(RestatedCM3):
    """Wrong: the users' uniformity over the distinct users of the batch (the reference counts a
    repeated user as often as it occurs)."""

    def calculate_loss(self, interaction):
        users, pos, neg = interaction[0], interaction[1], interaction[2]
        u_all, i_all, mix = self.forward(self.masked_adj)
        u, p, n = u_all[users], i_all[pos], i_all[neg]
        align = ((u - p) ** 2).sum(1).mean()
        uniform = (uniformity(u_all[torch.unique(users)])
                   + calibrated_uniformity(n, self.similarities(mix[neg])))
        return align + self.gamma * uniform / 2.0
