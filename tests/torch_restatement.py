"""An independent PyTorch statement of LIRDRec and of its trainer, for the parity tests.

Written for these tests from the paper and the reference's documented semantics (see
docs/reference_quirks.md), with the reference's *interface* (constructor arguments, parameter
names, attributes, methods), so that the parity machinery can run in CI without the
reference's code, which we cannot ship. It deliberately computes things differently from our
JAX code where it can: dense torch algebra for the graph normalisation, torch.topk for the
kNN graph, an explicit DCT-II matrix instead of an FFT, torch's own Adam and autograd.
"""
import math
import os

import numpy as np
import torch
from torch import nn

# The keys MMRec's framework classes (GeneralRecommender, Trainer, TopKEvaluator) read from a
# reference's config, read off their source; the same in every MMRec-based reference
# (enoche/LIRDRec, enoche/FREEDOM, enoche/CM3, Yuzhuo-Dang/MLLMRec).
MMREC_FRAMEWORK_KEYS = frozenset({
    'USER_ID_FIELD', 'ITEM_ID_FIELD', 'NEG_PREFIX', 'data_path', 'dataset', 'device', 'end2end',
    'is_multimodal_model', 'vision_feature_file', 'text_feature_file', 'train_batch_size',
    'clip_grad_norm', 'epochs', 'eval_batch_size', 'eval_step', 'eval_type', 'learner',
    'learning_rate', 'learning_rate_scheduler', 'metrics', 'model', 'stopping_step', 'topk',
    'valid_metric', 'valid_metric_bigger', 'save_recommended_topk'})


def dct_matrix(n: int) -> torch.Tensor:
    """(n, n) orthonormal DCT-II matrix C, so that DCT(x) = x @ C.T."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * k * (2 * j + 1) / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


def symmetric_normalised(a: torch.Tensor) -> torch.Tensor:
    """D^-1/2 A D^-1/2 with 1e-7 added to the degrees, as a sparse tensor."""
    degree = a.sum(1) + 1e-7
    scale = degree.pow(-0.5)
    return (scale[:, None] * a * scale[None, :]).to_sparse()


class ScoreHead(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.fc2(nn.functional.leaky_relu(self.fc1(x)))


class Fusion(nn.Module):
    def __init__(self, n_users: int, dim: int, base: float, w1: float):
        super().__init__()
        self.weco_a, self.weco_b, self.weco_c = (ScoreHead(dim, dim // 4) for _ in range(3))
        self.theta = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_users, 3)))
        self.w1, self.w2, self.base = w1, 1.0 - w1, base
        self.last_att = self.theta.detach().clone()

    def update_w(self, epoch: int):
        decayed = self.w1 * self.base ** epoch
        total = decayed + self.w2
        self.w1, self.w2 = decayed / total, self.w2 / total
        with torch.no_grad():
            self.theta.copy_(self.last_att)

    def forward(self, a, b, c):
        scores = torch.cat([self.weco_a(a), self.weco_b(b), self.weco_c(c)], dim=1)
        att = torch.softmax(self.w1 * scores + self.w2 * self.theta, dim=1)
        self.last_att = att.detach().clone()
        return torch.cat([att[:, 0:1] * a, att[:, 1:2] * b, att[:, 2:3] * c], dim=1)


class RestatedLIRDRec(nn.Module):
    """LIRDRec with the reference's interface: `(config, train_data)`, its parameter names,
    `norm_adj`, `mm_adj`, `interleaved_feat`, `pre_epoch_processing`, `forward(adj)`,
    `calculate_loss(interaction)`, `full_sort_predict(interaction)`, `result_embed`."""
    n_layers_offset = 0  # the must-fail test subclasses with -1

    def __init__(self, config, train_data):
        super().__init__()
        self.n_users = train_data.dataset.get_user_num()
        self.n_items = train_data.dataset.get_item_num()
        folder = os.path.join(config['data_path'], config['dataset'])
        v = np.load(os.path.join(folder, config['vision_feature_file']))
        t = np.load(os.path.join(folder, config['text_feature_file']))
        self.v_feat = torch.tensor(v, dtype=torch.float32)
        self.t_feat = torch.tensor(t, dtype=torch.float32)
        dim = self.embedding_dim = config['embedding_size']
        self.n_ui_layers, self.n_mm_layers = config['n_ui_layers'], config['n_mm_layers']
        self.reg_weight = config['reg_weight']
        self.cur_epoch = 0

        self.v_preference = nn.Parameter(nn.init.xavier_normal_(torch.empty(self.n_users, dim)))
        self.t_preference = nn.Parameter(nn.init.xavier_normal_(torch.empty(self.n_users, dim)))
        self.id_preference = nn.Parameter(nn.init.xavier_normal_(torch.empty(self.n_users, dim)))
        self.image_embedding = nn.Embedding.from_pretrained(self.v_feat.clone(), freeze=False)
        self.text_embedding = nn.Embedding.from_pretrained(self.t_feat.clone(), freeze=False)
        dv, dt = v.shape[1], t.shape[1]
        self.v_MLP, self.v_MLP_1 = nn.Linear(dv, 4 * dim), nn.Linear(4 * dim, dim, bias=False)
        self.t_MLP, self.t_MLP_1 = nn.Linear(dt, 4 * dim), nn.Linear(4 * dim, dim, bias=False)
        self.s_MLP, self.s_MLP_1 = (nn.Linear(dv + dt, 4 * dim),
                                    nn.Linear(4 * dim, dim, bias=False))
        self.fusion_module = Fusion(self.n_users, dim, config['decay_base'],
                                    config['decay_weight'])

        self.interleaved_feat = torch.cat(
            [(self.v_feat.double() @ dct_matrix(dv).T).float(),
             (self.t_feat.double() @ dct_matrix(dt).T).float()], dim=1)
        inter = train_data.inter_matrix(form='coo')
        n = self.n_users + self.n_items
        a = torch.zeros(n, n, dtype=torch.float64)
        rows = torch.as_tensor(inter.row, dtype=torch.long)
        cols = torch.as_tensor(inter.col, dtype=torch.long) + self.n_users
        a[rows, cols] = 1.0
        a[cols, rows] = 1.0
        self.norm_adj = symmetric_normalised(a).float().coalesce()
        w = config['mm_image_weight']
        self.mm_adj = (w * self.knn_graph(self.v_feat, config['knn_k'])
                       + (1 - w) * self.knn_graph(self.t_feat, config['knn_k'])).coalesce()
        self.masked_adj, self.result_embed = None, None

    @staticmethod
    def knn_graph(x: torch.Tensor, k: int) -> torch.Tensor:
        unit = x / x.norm(dim=1, keepdim=True)
        neighbours = torch.topk(unit @ unit.T, k, dim=1).indices
        rows = torch.arange(x.shape[0])[:, None].expand(-1, k).reshape(-1)
        values = torch.full((rows.numel(),), 1.0 / (k + 1e-7))  # every row has k entries
        return torch.sparse_coo_tensor(torch.stack([rows, neighbours.reshape(-1)]), values,
                                       (x.shape[0], x.shape[0]))

    def pre_epoch_processing(self):
        self.cur_epoch += 1
        self.fusion_module.update_w(self.cur_epoch)
        self.masked_adj = self.norm_adj

    def forward(self, adj):
        def tower(first, second, x):
            return second(nn.functional.leaky_relu(first(x)))

        views = [(self.v_preference, tower(self.v_MLP, self.v_MLP_1, self.v_feat)),
                 (self.t_preference, tower(self.t_MLP, self.t_MLP_1, self.t_feat)),
                 (self.id_preference, tower(self.s_MLP, self.s_MLP_1, self.interleaved_feat))]
        x = torch.cat([nn.functional.normalize(torch.cat(v, 0)) for v in views], 1)
        layers = [x]
        for _ in range(self.n_ui_layers + self.n_layers_offset):
            layers.append(torch.sparse.mm(adj, layers[-1]))
        total = torch.stack(layers).sum(0)
        users, items = total[:self.n_users], total[self.n_users:]
        d = self.embedding_dim
        users = self.fusion_module(users[:, :d], users[:, d:2 * d], users[:, 2 * d:])
        h = items
        for _ in range(self.n_mm_layers):
            h = torch.sparse.mm(self.mm_adj, h)
        items = items + h
        self.result_embed = torch.cat([users, items], 0)
        return users, items

    def calculate_loss(self, interaction):
        users, items = self.forward(self.masked_adj)
        u, p, n = users[interaction[0]], items[interaction[1]], items[interaction[2]]
        bpr = -nn.functional.logsigmoid((u * p).sum(1) - (u * n).sum(1)).mean()
        return bpr + self.reg_weight * (users.pow(2).mean() + items.pow(2).mean())

    def full_sort_predict(self, interaction):
        users, items = self.result_embed[:self.n_users], self.result_embed[self.n_users:]
        return users[interaction[0]] @ items.T


class RestatedEvaluator:
    """MMRec's top-k metrics from the definitions (per-user loops, plain Python)."""

    def __init__(self, config):
        self.metrics = [m.lower() for m in config['metrics']]
        self.topk = config['topk']

    def evaluate(self, batch_matrix_list, eval_data, is_test=False, idx=0):
        lists = torch.cat(batch_matrix_list, 0).numpy()
        truth = eval_data.get_eval_items()
        sums = {f'{m}@{k}': 0.0 for m in self.metrics for k in self.topk}
        for ranked, items in zip(lists, truth):
            relevant, n_rel = set(items.tolist()), len(items)
            hits = [int(i) in relevant for i in ranked]
            for k in self.topk:
                h = hits[:k]
                dcg = sum(1 / math.log2(r + 2) for r, x in enumerate(h) if x)
                idcg = sum(1 / math.log2(r + 2) for r in range(min(n_rel, k)))
                ap = sum(sum(h[:r + 1]) / (r + 1) for r, x in enumerate(h) if x) / min(n_rel, k)
                values = {'recall': sum(h) / n_rel, 'precision': sum(h) / k,
                          'ndcg': dcg / idcg, 'map': ap}
                for m in self.metrics:
                    sums[f'{m}@{k}'] += values[m]
        return {key: round(v / len(truth), 4) for key, v in sums.items()}


class RestatedTrainer:
    """The reference trainer's interface: Adam, a LambdaLR schedule, epoch and evaluation."""

    def __init__(self, config, model):
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config['learning_rate'])
        factor, every = config['learning_rate_scheduler']
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda epoch: factor ** (epoch / every))
        self.evaluator = RestatedEvaluator(config)
        self.k = max(config['topk'])

    def _train_epoch(self, train_data, epoch_idx):
        total, per_batch = 0.0, []
        for interaction in train_data:
            self.optimizer.zero_grad()
            loss = self.model.calculate_loss(interaction)
            loss.backward()
            self.optimizer.step()
            total += loss.item()
            per_batch.append(loss.detach())
        return total, per_batch

    @torch.no_grad()
    def evaluate(self, eval_data, is_test=False, idx=0):
        lists = []
        for users, mask in eval_data:
            scores = self.model.full_sort_predict([users])
            scores[mask[0], mask[1]] = -1e10
            lists.append(torch.topk(scores, self.k, dim=-1).indices)
        return self.evaluator.evaluate(lists, eval_data)
