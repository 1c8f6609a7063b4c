"""The shared parity machinery (lirdrec_jax/parity/common.py, checks.py) on hand-built inputs:
the kNN tie detector, and the noise floor of the training trajectories (the verdict, and the
one-ulp perturbation that measures the floor)."""
import numpy as np
import pytest
import scipy.sparse as sp

from lirdrec_jax.parity import checks
from lirdrec_jax.parity.common import compare_sparse, knn_tie_rows


def at_angles(degrees) -> np.ndarray:
    """Unit vectors in the plane: cosine similarities are cosines of angle differences."""
    radians = np.deg2rad(np.asarray(degrees, np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def test_tie_rows_are_rows_whose_top_k_boundary_falls_inside_a_group_of_equal_similarities():
    # Items 2 and 3 are the same vector (a duplicated feature row). With k = 3 (the row itself
    # included, as the reference's torch.topk over the full similarity matrix):
    #   row 0 (0 deg):   1, cos 10, cos 20 = cos 20 (items 2, 3)  -> boundary inside the pair
    #   row 1 (10 deg):  1, cos 10 (items 0, 2, 3 all at 10 deg)   -> boundary inside the triple
    #   row 2, row 3:    1, 1 (self and duplicate), cos 10 | cos 20 -> clear gap at the boundary
    #   row 4 (90 deg):  1, cos 70 = cos 70 (items 2, 3) | cos 80   -> the pair is inside the top 3
    #   row 5 (180 deg): 1, cos 90, cos 160 = cos 160 (items 2, 3)  -> boundary inside the pair
    features = at_angles([0, 10, 20, 20, 90, 180])
    np.testing.assert_array_equal(knn_tie_rows(features, 3), [0, 1, 5])
    # Row blocks smaller than the table give the same rows.
    np.testing.assert_array_equal(knn_tie_rows(features, 3, block=2), [0, 1, 5])
    # k = 2: row 0 (1, cos 10 | cos 20) and row 5 (1, cos 90 | cos 160) have a clear gap; rows 2
    # and 3 hold self and duplicate at 1 with nothing else at 1: no ambiguity; row 1 holds three
    # items at cos 10 for one place; row 4 two at cos 70 for one place.
    np.testing.assert_array_equal(knn_tie_rows(features, 2), [1, 4])
    # k = all items: every row keeps everything, nothing is ambiguous.
    assert knn_tie_rows(features, 6).size == 0


def test_near_ties_within_rel_count_and_a_gap_above_rel_does_not():
    # k = 2. Row 0: 1, cos 30 | cos 30.00001; the gap is sin 30 * 1e-5 * pi / 180 = 8.7e-8,
    # 1.0e-7 relative to cos 30: within the default rel 1e-6. Row 3 (120 deg): 1, cos 30 |
    # cos 30.6, a relative gap of 6e-3.
    features = at_angles([0, 30, 30.00001, 120, 150, 150.6])
    ties = knn_tie_rows(features, 2)
    assert 0 in ties
    assert 3 not in ties
    # A rel below 1e-7 separates row 0's near tie; one above 6e-3 joins row 3's.
    assert 0 not in knn_tie_rows(features, 2, rel=5e-8)
    assert 3 in knn_tie_rows(features, 2, rel=1e-2)


def ordered_top_k(features: np.ndarray, k: int, prefer_lower: bool) -> np.ndarray:
    """Top-k neighbour sets (self included) with ties broken towards the lower or the higher
    index: two correct kNN implementations."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    sim = unit @ unit.T
    index = np.arange(sim.shape[1])
    out = []
    for row in sim:
        order = np.lexsort((index if prefer_lower else -index, -row))
        out.append(np.sort(order[:k]))
    return np.array(out)


def test_every_row_where_two_tie_breaking_orders_disagree_is_a_tie_row():
    # A table where 10% of the items carry another item's features, as in a real dataset with
    # duplicated feature rows.
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 6))
    copies = rng.choice(200, size=20, replace=False)
    features[copies] = features[rng.choice(np.setdiff1d(np.arange(200), copies), size=20)]
    k = 10
    lower, higher = ordered_top_k(features, k, True), ordered_top_k(features, k, False)
    disagree = np.flatnonzero((lower != higher).any(axis=1))
    ties = knn_tie_rows(features, k)
    assert disagree.size > 0  # the table does exercise ties
    assert set(disagree) <= set(ties)
    # And nothing but ties is flagged: every flagged row has equal k-th and (k+1)-th values.
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    ranked = -np.sort(-(unit @ unit.T), axis=1)
    np.testing.assert_allclose(ranked[ties, k - 1], ranked[ties, k], rtol=1e-12)


def test_a_tie_may_change_a_mixed_rows_values_without_changing_its_structure():
    # k = 2 neighbours per modality, mixed 0.1 image + 0.9 text; items 1 and 2 are duplicates.
    # Row 0: both sides take {1, 2} in text; in image ours takes {0, 1}, the reference {0, 2}.
    # Same entries, different values: explained by the tie. Row 1 is equal; row 2 has a wrong
    # value (not a tie row); row 3 a different neighbour (not a tie row).
    ours = sp.csr_matrix(np.array([[.05, .5, .45, 0], [0, .5, .5, 0], [.5, 0, .5, 0],
                                   [0, 0, .5, .5]]))
    ref = sp.csr_matrix(np.array([[.05, .45, .5, 0], [0, .5, .5, 0], [.5, 0, .4, 0],
                                  [0, .5, 0, .5]]))
    structure, values = compare_sparse('kNN', ours, ref, 1e-6, allowed_rows=np.array([0, 3]))
    assert structure.passed and structure.max_abs == 1  # row 3 differs, and is a tie row
    assert not values.passed and values.max_abs == pytest.approx(0.1)  # row 2
    assert values.note == '2 rows with tied neighbours not compared'
    structure, values = compare_sparse('kNN', ours, ref, 1e-6, allowed_rows=np.array([0, 2]))
    assert not structure.passed and '1 rows differ without ties' in structure.note
    assert values.passed  # rows 0, 2 (ties) and 3 (a structure difference) not compared
    _, values = compare_sparse('kNN', ours, ref, 1e-6, allowed_rows=np.array([], int))
    assert not values.passed and values.max_abs == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------
# The noise floor of the training trajectories
# ----------------------------------------------------------------------------------------------

def test_floor_check_passes_up_to_the_multiple_of_the_floor_and_fails_above_it():
    step = 2.0 ** -20  # exact in float64: the differences below are exact
    ref, perturbed = [0.5, 2.0], [0.5 + step, 2.0]  # floor = step
    at_bound = checks.floor_check('q', [0.5, 2.0 + 10 * step], ref, perturbed, minimum=1e-9)
    assert at_bound.passed and at_bound.floor == step and at_bound.max_abs == 10 * step
    assert at_bound.tolerance == '|d| <= 9.54e-06 (10 floor)'
    above = checks.floor_check('q', [0.5, 2.0 + 11 * step], ref, perturbed, minimum=1e-9)
    assert not above.passed
    assert checks.floor_check('q', [0.5, 2.0 + 3 * step], ref, perturbed, minimum=1e-9,
                              multiple=3).passed
    # A bit-identical perturbed run (floor 0): the minimum decides.
    same = checks.floor_check('q', 0.25 + 2.0 ** -14, 0.25, 0.25, minimum=1e-4)
    assert same.passed and same.floor == 0 and same.tolerance == '|d| <= 0.0001 (minimum)'
    assert not checks.floor_check('q', 0.25 + 2.0 ** -13, 0.25, 0.25, minimum=1e-4).passed


def test_floor_metrics_check_aligns_keys_and_the_report_shows_the_floor():
    ref = {'recall@10': 0.0200, 'ndcg@10': 0.0100}
    perturbed = {'recall@10': 0.0201, 'ndcg@10': 0.0100}  # floor 1e-4 (one rounding unit)
    ours = {'ndcg@10': 0.0100, 'recall@10': 0.0209}
    check = checks.floor_metrics_check('epoch 2: valid metrics', ours, ref, perturbed,
                                       minimum=1e-4)
    assert check.passed and check.floor == pytest.approx(1e-4) and check.max_abs == \
        pytest.approx(9e-4)
    # A bug at the scale of Baby's metrics (0.02): 0.03 instead of 0.02 is 100 floors.
    assert not checks.floor_metrics_check('m', {**ours, 'recall@10': 0.03}, ref, perturbed,
                                          minimum=1e-4).passed
    assert not checks.floor_metrics_check('m', {'recall@10': 0.02}, ref, perturbed,
                                          minimum=1e-4).passed
    # Ours against the reference, the floor, and the bound, on one line; no floor for the
    # quantities with analytic tolerances.
    table = checks.report([check, checks.compare('loss', 1.0, 1.0, atol=0)]).splitlines()
    assert table[0].split() == ['quantity', 'max', 'abs', 'max', 'rel', 'floor', 'tolerance',
                                'result']
    assert table[2].split() == ['epoch', '2:', 'valid', 'metrics', '0.0009', '0.045', '0.0001',
                                '|d|', '<=', '0.001', '(10', 'floor)', 'PASS']
    assert table[3].split() == ['loss', '0', '0', '|d|', '<=', '0', 'PASS']
    assert table[3].index('|d|') == table[2].index('|d|')


def test_perturbed_copy_moves_every_float_parameter_one_ulp_up_and_nothing_else():
    torch = pytest.importorskip('torch')
    from lirdrec_jax.parity.common import perturbed_copy

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # 0, a negative power of two (its ulp towards +inf is the smaller one), a subnormal.
            self.w = torch.nn.Parameter(torch.tensor([0.0, -1.0, 1.0, 1e-40]))
            self.theta = torch.nn.Parameter(torch.tensor([[0.3, -2.5]]))
            self.register_buffer('steps', torch.tensor([3]))
            self.features = torch.tensor([1.0, 2.0])   # a plain attribute (features, graphs)
            self.last_att = self.theta.data            # the reference PWC's alias of theta
            self.cached = self.w * 2                   # a tensor with autograd history

    model = Model()
    w0, theta0 = model.w.detach().numpy().copy(), model.theta.detach().numpy().copy()
    twin = perturbed_copy(model)
    w1, theta1 = twin.w.detach().numpy(), twin.theta.detach().numpy()
    np.testing.assert_array_equal(w1, np.nextafter(w0, np.float32(np.inf)))
    np.testing.assert_array_equal(theta1, np.nextafter(theta0, np.float32(np.inf)))
    assert w1[0] == np.float32(1.4e-45) and w1[1] == np.float32(-1 + 2.0 ** -24)
    assert w1[2] == np.float32(1 + 2.0 ** -23) and w1[3] == np.float32(1e-40) + 2.0 ** -149
    assert (w1 != w0).all() and (theta1 != theta0).all()
    # Nothing else moved; the alias is the twin's theta, as in the original.
    assert torch.equal(twin.steps, model.steps) and torch.equal(twin.features, model.features)
    assert torch.equal(twin.cached, model.cached.detach())
    assert twin.last_att.data_ptr() == twin.theta.data_ptr()
    # The original is untouched.
    np.testing.assert_array_equal(model.w.detach().numpy(), w0)
    assert model.last_att.data_ptr() == model.theta.data_ptr()
    np.testing.assert_array_equal(model.last_att.numpy(), theta0)


def test_twins_start_each_epoch_from_the_same_random_state():
    torch = pytest.importorskip('torch')
    from lirdrec_jax.parity.common import ReferenceSide, ReferenceTwins, same_masked_adjacency

    class Drawing(torch.nn.Module):
        """Draws its training graph with torch's global generator, as FREEDOM's pruning."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))
            self.masked_adj = None

        def pre_epoch_processing(self):
            kept = torch.multinomial(torch.ones(50), 10)
            self.masked_adj = torch.sparse_coo_tensor(kept[None], torch.ones(10), (50,),
                                                      check_invariants=True)

    torch.manual_seed(5)
    alone = Drawing()
    alone.pre_epoch_processing()
    after_alone = torch.rand(1)
    torch.manual_seed(5)
    twins = ReferenceTwins(ReferenceSide(Drawing, lambda cfg, model: None), Drawing(), None)
    assert twins.start_epoch()
    # The reference's draw is the one it makes alone, and the generator moves on as if the
    # perturbed copy had not drawn.
    assert torch.equal(twins.models[0].masked_adj._indices(), alone.masked_adj._indices())
    assert torch.equal(torch.rand(1), after_alone)
    twins.models[1].masked_adj = alone.masked_adj * 2
    assert not same_masked_adjacency(*twins.models)
