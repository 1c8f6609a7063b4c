"""The Colab notebook (notebooks/colab.ipynb), executed from top to bottom in a Jupyter kernel
with papermill's convention done by hand: a cell after the one tagged `parameters` overrides
INSTALL, EPOCHS and WORKDIR. Then its outputs are checked against the runs' own files."""
import base64
import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / 'notebooks' / 'colab.ipynb'
EPOCHS = 3
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def with_injected_parameters(nb, source: str):
    """`nb` with a code cell of `source` right after its `parameters` cell, as papermill does."""
    tagged = [i for i, cell in enumerate(nb.cells)
              if 'parameters' in cell.metadata.get('tags', [])]
    assert len(tagged) == 1, f'expected one cell tagged "parameters", found {len(tagged)}'
    cell = nbformat.v4.new_code_cell(source, metadata={'tags': ['injected-parameters']})
    nb.cells.insert(tagged[0] + 1, cell)
    return nb


def cell_with(nb, text: str):
    """The one code cell whose source contains `text`."""
    cells = [c for c in nb.cells if c.cell_type == 'code' and text in c.source]
    assert len(cells) == 1, f'expected one code cell containing {text!r}, found {len(cells)}'
    return cells[0]


def stream_text(cell) -> str:
    """What the cell printed (stdout and stderr)."""
    return ''.join(o.get('text', '') for o in cell.outputs if o.output_type == 'stream')


def rich_outputs(cell, mime: str) -> list:
    """The cell's displayed outputs of type `mime` (e.g. 'image/png'), in order."""
    return [o.data[mime] for o in cell.outputs
            if o.output_type in ('display_data', 'execute_result') and mime in o.get('data', {})]


def markdown_rows(table: str) -> dict:
    """{first cell: {column header: cell}} of a Markdown table, bold marks and daggers removed."""
    def cells(line):
        return [c.strip().strip('*').rstrip('†').strip('*') for c in line.strip('|').split('|')]

    lines = [line for line in table.splitlines() if line.startswith('|')]
    header = cells(lines[0])
    return {row[0]: dict(zip(header, row)) for row in map(cells, lines[2:])}


def best_test(results: dict, metric: str) -> float:
    best = next(p for p in results['points'] if p['index'] == results['best_point'])
    return best['best_test'][metric]


def test_the_notebook_trains_plots_and_compares_two_models(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get('outputs') for c in nb.cells), 'the notebook is saved with outputs'
    workdir = tmp_path / 'runs'
    nb = with_injected_parameters(
        nb, f'# Parameters\nINSTALL = False\nEPOCHS = {EPOCHS}\nWORKDIR = {str(workdir)!r}\n')
    # Raises CellExecutionError, naming the cell and its traceback, if any cell fails.
    NotebookClient(nb, timeout=900, kernel_name='python3',
                   resources={'metadata': {'path': str(tmp_path)}}).execute()

    # This machine has no accelerator.
    assert 'CPU only' in stream_text(cell_with(nb, 'jax.default_backend()'))

    parameters = cell_with(nb, "MODEL_A = '")
    models = [line.split("'")[1] for line in parameters.source.splitlines()
              if line.startswith(('MODEL_A', 'MODEL_B'))]
    dataset = next(line.split("'")[1] for line in parameters.source.splitlines()
                   if line.startswith('DATASET'))
    results = {}
    for model in models:
        path = workdir / f'{model}-{dataset}' / 'results.json'
        assert path.is_file(), f'{path} was not written'
        results[model] = json.loads(path.read_text())
        assert results[model]['model'] == model and results[model]['finished']
        # EPOCHS reached the config: every point trained exactly that many epochs.
        assert [p['epochs_done'] for p in results[model]['points']] == \
            [EPOCHS] * len(results[model]['points'])

    # Markdown outputs: the table, its legend, the pairwise tests.
    table, _, pairs = rich_outputs(cell_with(nb, "format_table(c, 'markdown')"), 'text/markdown')
    assert f'| Recall@20 | {models[0]} | {models[1]} |' in pairs
    latex = stream_text(cell_with(nb, "format_table(c, 'latex')"))
    rows = markdown_rows(table)
    assert sorted(rows) == sorted(models), table
    for model in models:
        value = f'{best_test(results[model], "recall@20"):.4f}'
        assert rows[model]['Recall@20'] == value, (model, value, table)
        latex_row = next(line for line in latex.splitlines() if line.startswith(f'{model} &'))
        assert value in latex_row, (model, value, latex)

    images = rich_outputs(cell_with(nb, 'plot.plot_run('), 'image/png')
    n_points = sum(len(r['points']) for r in results.values())
    assert len(images) == n_points
    assert all(base64.b64decode(image).startswith(PNG_MAGIC) for image in images)
