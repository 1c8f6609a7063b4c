"""The reference loader (lirdrec_jax/parity/reference.py) on a minimal fake checkout with an
MMRec repository's layout, written here: its compatibility shims make the reference's calls of
removed library functions work (SciPy's `dok_matrix._update`, NumPy's `np.float`, PyTorch's
`torch.sparse.FloatTensor`) with the numbers the old functions gave, the checkout is left as
it was, and a wrong checkout is a clear error."""
import sys
import textwrap
import types

import numpy as np
import pytest
import scipy.sparse as sp

from lirdrec_jax.parity import reference

torch = pytest.importorskip('torch')

# The fake checkout: the files load_reference imports, with code as the reference writes it.
FAKE_CHECKOUT = {
    'src/common/abstract_recommender.py': '''
        from torch import nn


        class GeneralRecommender(nn.Module):
            def __init__(self, n_users, n_items):
                super().__init__()
                self.n_users, self.n_items = n_users, n_items
                self.n_nodes = n_users + n_items
        ''',
    # get_norm_adj_mat and compute_normalized_laplacian as in enoche/LIRDRec's
    # src/models/lirdrec.py (FREEDOM's are the same).
    'src/models/toy.py': '''
        import numpy as np
        import scipy.sparse as sp
        import torch

        from common.abstract_recommender import GeneralRecommender


        class Toy(GeneralRecommender):
            def __init__(self, interaction_matrix, n_users, n_items):
                super().__init__(n_users, n_items)
                self.interaction_matrix = interaction_matrix
                self.norm_adj = self.get_norm_adj_mat()

            def compute_normalized_laplacian(self, indices, adj_size):
                adj = torch.sparse.FloatTensor(indices, torch.ones_like(indices[0]), adj_size)
                row_sum = 1e-7 + torch.sparse.sum(adj, -1).to_dense()
                r_inv_sqrt = torch.pow(row_sum, -0.5)
                rows_inv_sqrt = r_inv_sqrt[indices[0]]
                cols_inv_sqrt = r_inv_sqrt[indices[1]]
                values = rows_inv_sqrt * cols_inv_sqrt
                return torch.sparse.FloatTensor(indices, values, adj_size)

            def get_norm_adj_mat(self):
                A = sp.dok_matrix((self.n_users + self.n_items,
                                   self.n_users + self.n_items), dtype=np.float32)
                inter_M = self.interaction_matrix
                inter_M_t = self.interaction_matrix.transpose()
                data_dict = dict(zip(zip(inter_M.row, inter_M.col + self.n_users),
                                     [1] * inter_M.nnz))
                data_dict.update(dict(zip(zip(inter_M_t.row + self.n_users, inter_M_t.col),
                                          [1] * inter_M_t.nnz)))
                A._update(data_dict)
                sumArr = (A > 0).sum(axis=1)
                diag = np.array(sumArr.flatten())[0] + 1e-7
                diag = np.power(diag, -0.5)
                D = sp.diags(diag)
                L = D * A * D
                L = sp.coo_matrix(L)
                row = L.row
                col = L.col
                i = torch.LongTensor(np.array([row, col]))
                data = torch.FloatTensor(L.data)
                return torch.sparse.FloatTensor(i, data, torch.Size((self.n_nodes, self.n_nodes)))
        ''',
    'src/common/trainer.py': '''
        import matplotlib.pyplot as plt

        from utils.topk_evaluator import TopKEvaluator


        class Trainer:
            pass
        ''',
    'src/utils/topk_evaluator.py': '''
        class TopKEvaluator:
            pass
        ''',
    # map_ as in the reference's src/utils/metrics.py.
    'src/utils/metrics.py': '''
        import numpy as np


        def map_(pos_index, pos_len):
            pre = pos_index.cumsum(axis=1) / np.arange(1, pos_index.shape[1] + 1)
            sum_pre = np.cumsum(pre * pos_index.astype(np.float), axis=1)
            len_rank = np.full_like(pos_len, pos_index.shape[1])
            actual_len = np.where(pos_len > len_rank, len_rank, pos_len)
            result = np.zeros_like(pos_index, dtype=np.float)
            for row, lens in enumerate(actual_len):
                ranges = np.arange(1, pos_index.shape[1]+1)
                ranges[lens:] = ranges[lens - 1]
                result[row] = sum_pre[row] / ranges
            return result.mean(axis=0)
        ''',
}
# Top-level packages of the fake checkout's src/ (the reference's are the same).
CHECKOUT_PACKAGES = ('models', 'common', 'utils')


def write_checkout(root, files=FAKE_CHECKOUT):
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


def snapshot(root):
    """Every file and folder of the checkout with its bytes (bytecode caches included: the
    loader must not write them either)."""
    return {p.relative_to(root): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob('*'))}


@pytest.fixture
def isolated(monkeypatch):
    """Runs the test as if in a fresh process: no shim installed yet, no module of another
    checkout imported, and puts everything back afterwards (load_reference changes sys.path,
    sys.modules and the patched libraries for the rest of the process)."""
    monkeypatch.setattr(sys, 'path', list(sys.path))
    for name in list(sys.modules):
        if name.split('.')[0] in CHECKOUT_PACKAGES:
            monkeypatch.delitem(sys.modules, name)
    # The removed functions, absent as in current SciPy/NumPy/PyTorch; restored to their state
    # before the test at its end (setattr first, so that the attribute is deleted again if it
    # did not exist).
    for owner, name in ((sp.dok_matrix, '_update'), (np, 'float'),
                        (torch.sparse, 'FloatTensor')):
        monkeypatch.setattr(owner, name, None, raising=False)
        monkeypatch.delattr(owner, name)
    # torch_dct (which the real reference imports) need not be installed for the fake one.
    monkeypatch.setitem(sys.modules, 'torch_dct', types.ModuleType('torch_dct'))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        top = name.split('.')[0]
        if top in CHECKOUT_PACKAGES or (top == 'matplotlib' and
                                        getattr(sys.modules[name], '__file__', None) is None):
            del sys.modules[name]  # the fake checkout's modules and a matplotlib stub


# (PyTorch warns once about its sparse invariant checks when the shim builds a COO tensor.)
@pytest.mark.filterwarnings('ignore:Sparse invariant checks')
def test_shims_make_the_references_calls_of_removed_functions_work(tmp_path, isolated,
                                                                  monkeypatch):
    checkout = write_checkout(tmp_path / 'Toy')
    before = snapshot(checkout)
    monkeypatch.setattr(sys, 'dont_write_bytecode', False)  # as Python runs by default
    # Without the shims, the reference's code fails on current libraries.
    interactions = sp.coo_matrix((np.ones(3), ([0, 0, 1], [0, 2, 2])), shape=(2, 3))
    with pytest.raises(AttributeError):
        sp.dok_matrix((5, 5), dtype=np.float32)._update({(0, 2): 1})
    with pytest.raises(AttributeError):
        np.float  # noqa: B018
    with pytest.raises(AttributeError):
        torch.sparse.FloatTensor  # noqa: B018

    ref = reference.load_reference(checkout, 'toy', 'Toy', 'someone/Toy')
    assert ref.Model.__name__ == 'Toy' and ref.source == checkout / 'src'
    assert ref.Trainer.__name__ == 'Trainer' and ref.TopKEvaluator.__name__ == 'TopKEvaluator'

    # dok_matrix._update fills the matrix (dropping the call would give an empty graph): the
    # symmetric normalised adjacency D^-1/2 A D^-1/2 of users 0, 1 and items 0, 1, 2 with
    # interactions (0, 0), (0, 2), (1, 2), worked out by hand. Degrees: user 0: 2, user 1: 1,
    # item 0: 1, item 1: 0, item 2: 2.
    model = ref.Model(interactions, 2, 3)
    expected = np.zeros((5, 5))
    for u, i, value in ((0, 2, 1 / np.sqrt(2)), (0, 4, 1 / 2), (1, 4, 1 / np.sqrt(2))):
        expected[u, i] = expected[i, u] = value
    adjacency = model.norm_adj.to_dense().numpy()
    assert model.norm_adj.dtype == torch.float32
    np.testing.assert_allclose(adjacency, expected, rtol=1e-6)

    # torch.sparse.FloatTensor with integer values (as the kNN graph calls it) gives float32.
    indices = torch.tensor([[0, 0, 1, 2], [1, 2, 0, 0]])
    laplacian = model.compute_normalized_laplacian(indices, torch.Size((3, 3)))
    assert laplacian.dtype == torch.float32
    # Row sums 2, 1, 1: entry (r, c) = 1 / sqrt(rowsum_r * rowsum_c).
    hand = np.array([[0, 1 / np.sqrt(2), 1 / np.sqrt(2)], [1 / np.sqrt(2), 0, 0],
                     [1 / np.sqrt(2), 0, 0]])
    np.testing.assert_allclose(laplacian.to_dense().numpy(), hand, rtol=1e-6)

    # np.float in the reference's metrics: MAP@1..3 of two users, by hand: user 0 hits at
    # ranks 1 and 3 of its 2 items (AP 1, 1/2, (1 + 2/3) / 2), user 1 at rank 2 of 1 item
    # (AP 0, 1/2, 1/2).
    pos_index = np.array([[True, False, True], [False, True, False]])
    np.testing.assert_allclose(ref.metrics.map_(pos_index, np.array([2, 1])),
                               [0.5, 0.5, (5 / 6 + 1 / 2) / 2])

    assert snapshot(checkout) == before  # nothing in the checkout was changed or added


def test_a_folder_that_is_not_the_reference_is_a_clear_error(tmp_path, isolated):
    nowhere = tmp_path / 'nowhere'
    with pytest.raises(reference.ReferenceError_) as err:
        reference.load_reference(nowhere)
    message = str(err.value)
    assert str(nowhere / 'src' / 'models' / 'lirdrec.py') in message
    assert 'enoche/LIRDRec' in message
    # A checkout of another repository: it names the model file this one lacks.
    other = write_checkout(tmp_path / 'FREEDOM')
    with pytest.raises(reference.ReferenceError_, match='enoche/FREEDOM'):
        reference.load_reference(other, 'freedom', 'FREEDOM', 'enoche/FREEDOM')


def test_an_incomplete_checkout_is_a_clear_error(tmp_path, isolated):
    files = {k: v for k, v in FAKE_CHECKOUT.items() if k != 'src/common/trainer.py'}
    checkout = write_checkout(tmp_path / 'Toy', files)
    with pytest.raises(reference.ReferenceError_) as err:
        reference.load_reference(checkout, 'toy', 'Toy')
    assert f'cannot import the reference from {checkout / "src"}' in str(err.value)
    assert 'common.trainer' in str(err.value)


def test_missing_parity_packages_are_named(tmp_path, isolated, monkeypatch):
    checkout = write_checkout(tmp_path / 'Toy')
    monkeypatch.setitem(sys.modules, 'torch_dct', None)  # as if not installed
    with pytest.raises(reference.ReferenceError_, match=r'needs torch_dct: pip install'):
        reference.load_reference(checkout, 'toy', 'Toy')
