"""An independent PyTorch statement of DGVAE's training loss and evaluation scores, written from
the paper's and the reference's math (not from lirdrec_jax/models/dgvae.py): a dense item graph,
one loop per factor and per factor pair, the decoder's mixture summed in probability space
(exp, weight, sum, log) as the reference does. All random draws are arguments.

Shapes: B users, n items (or words), K factors, d latent size. Parameters per view are a dict
with 'kernel' (n, 2d), 'bias' (2d,), 'items' (n, d), 'prototypes' (K, d).
"""
import torch


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row divided by max(its L2 norm, 1e-12)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def assignments(view: dict, tau: float, gumbel=None) -> torch.Tensor:
    """(n, K) softmax over factors of the cosine of each item with each prototype over tau,
    plus Gumbel noise in training."""
    logits = unit_rows(view['items']) @ unit_rows(view['prototypes']).T / tau
    if gumbel is not None:
        logits = logits + gumbel
    return torch.softmax(logits, dim=1)


def encode(view: dict, x: torch.Tensor, cates: torch.Tensor, graph=None, keep=None,
           dropout: float = 0.0, eps=None) -> tuple:
    """([z_k (B, d)] * K, [logvar_k (B, d)] * K) of one view."""
    d = view['bias'].shape[0] // 2
    zs, logvars = [], []
    for k in range(cates.shape[1]):
        xk = unit_rows(x * cates[:, k][None, :])
        if graph is not None:
            xk = 0.5 * (xk + (xk @ graph) @ graph)
        if keep is not None:
            xk = xk * keep[k] / (1.0 - dropout)
        h = xk @ view['kernel'] + view['bias']
        mu = unit_rows(h[:, :d])
        logvar = -h[:, d:]
        z = mu if eps is None else mu + eps[k] * torch.exp(0.5 * logvar)
        zs.append(unit_rows(z))
        logvars.append(logvar)
    return zs, logvars


def attend(queries: list, keys: list, values: list) -> list:
    """Co-attention, one factor pair at a time: out_i = sum_j w_ij v_j with
    w_ij = tanh(q_i . k_j) * sigmoid(a_ij - mean_j' a_ij'), a_ij = -||q_i - k_j||_1."""
    K = len(queries)
    out = []
    for i in range(K):
        a = [-(queries[i] - keys[j]).abs().sum(dim=1) for j in range(K)]
        a_mean = sum(a) / K
        acc = 0.0
        for j in range(K):
            w = torch.tanh((queries[i] * keys[j]).sum(dim=1)) * torch.sigmoid(a[j] - a_mean)
            acc = acc + w[:, None] * values[j]
        out.append(acc)
    return out


def mutual_information(xs: list, ys: list) -> torch.Tensor:
    """Batch mean of 1/K sum_i [mean_{j != i} softplus(x_i . y_j) + softplus(-x_i . y_i)]."""
    K = len(xs)
    sp = torch.nn.functional.softplus
    total = 0.0
    for i in range(K):
        negatives = [sp((xs[i] * ys[j]).sum(dim=1)) for j in range(K) if j != i]
        e_n = sum(negatives) / len(negatives)
        e_p = -sp(-(xs[i] * ys[i]).sum(dim=1))
        total = total + (e_n - e_p).mean()
    return total / K


def decode(zs: list, view: dict, cates: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, n) log of sum_k cates_k * exp(z_k . unit(items) / tau)."""
    items = unit_rows(view['items'])
    probs = 0.0
    for k, z in enumerate(zs):
        probs = probs + torch.exp(z @ items.T / tau) * cates[:, k][None, :]
    return torch.log(probs)


def kl(logvars: list) -> torch.Tensor:
    """sum_k batch mean of -1/2 sum_d (1 + logvar - exp(logvar))."""
    return sum((-0.5 * (1 + lv - lv.exp()).sum(dim=1)).mean() for lv in logvars)


def cross_entropy(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return -(torch.log_softmax(logits, dim=1) * x).sum(dim=1).mean()


def forward(cf: dict, text: dict, x_cf, x_text, graph, hp: dict, noise=None) -> dict:
    """Both views, the co-attention and both decoders; `noise` None = evaluation mode.
    `noise`: dict with cf_gumbel, text_gumbel, cf_keep, text_keep, cf_eps, text_eps."""
    n = noise or {}
    cf_cates = assignments(cf, hp['tau'], n.get('cf_gumbel'))
    text_cates = assignments(text, hp['tau'], n.get('text_gumbel'))
    z_cf, lv_cf = encode(cf, x_cf, cf_cates, graph, n.get('cf_keep'), hp['dropout'],
                         n.get('cf_eps'))
    z_text, lv_text = encode(text, x_text, text_cates, None, n.get('text_keep'), hp['dropout'],
                             n.get('text_eps'))
    text_given_cf = attend(z_cf, z_text, z_text)
    cf_given_text = attend(z_text, z_cf, z_cf)
    z = [a + b for a, b in zip(cf_given_text, text_given_cf)]
    return {'cf_logits': decode(z, cf, cf_cates, hp['tau']),
            'text_logits': decode(z, text, text_cates, hp['tau']),
            'cf_given_text': cf_given_text, 'text_given_cf': text_given_cf,
            'cf_logvar': lv_cf, 'text_logvar': lv_text}


def loss(cf: dict, text: dict, x_cf, x_text, graph, hp: dict, noise: dict, step: int) -> dict:
    """The training loss of one batch (every row real) at update `step` (1-based)."""
    out = forward(cf, text, x_cf, x_text, graph, hp, noise)
    a_r = min(hp['rating_anneal_cap'], step / hp['rating_total_anneal_steps'])
    a_t = min(hp['text_anneal_cap'], step / hp['text_total_anneal_steps'])
    terms = {'cf_ce': cross_entropy(x_cf, out['cf_logits']), 'cf_kl': kl(out['cf_logvar']),
             'text_ce': cross_entropy(x_text, out['text_logits']),
             'text_kl': kl(out['text_logvar']),
             'mi': mutual_information(out['cf_given_text'], out['text_given_cf'])}
    terms['total'] = (terms['cf_ce'] + a_r * terms['cf_kl']
                      + hp['lambda_text'] * (terms['text_ce'] + a_t * terms['text_kl'])
                      + hp['lambda_reg'] * terms['mi'])
    return terms
