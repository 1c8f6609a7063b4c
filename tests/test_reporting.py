"""The final table's layout."""
from lirdrec_jax import reporting


def test_metrics_table_has_one_line_per_label_and_metric_and_one_column_per_cutoff():
    valid = {'recall@5': 0.1, 'recall@10': 0.2, 'ndcg@5': 0.05, 'ndcg@10': 0.0625}
    test = {'recall@5': 0.3, 'recall@10': 0.4, 'ndcg@5': 0.15, 'ndcg@10': 0.1234}
    table = reporting.metrics_table([('lirdrec valid', valid), ('lirdrec test', test)],
                                    ['recall', 'ndcg'], [5, 10]).splitlines()
    assert table[0].split() == ['@5', '@10']
    assert table[2].split() == ['lirdrec', 'valid', 'recall', '0.1000', '0.2000']
    assert table[5].split() == ['lirdrec', 'test', 'ndcg', '0.1500', '0.1234']
    assert len(table) == 6


def test_grid_table_lists_each_point_with_its_best_epoch():
    points = [{'values': {'model.reg_weight': 0.01}, 'best_epoch': 7,
               'best_valid': {'recall@20': 0.25}, 'best_test': {'recall@20': 0.24}}]
    lines = reporting.grid_table(points, ['model.reg_weight'], 'recall@20').splitlines()
    assert lines[2].split() == ['0.01', '7', '0.2500', '0.2400']
