"""Comparison records and the report table of the parity command."""
from typing import List, NamedTuple, Optional

import numpy as np


class Check(NamedTuple):
    """One compared quantity.

    Attributes:
      name: what was compared.
      max_abs: max |ours - reference| over the compared elements.
      max_rel: max |ours - reference| / |reference| over elements with |reference| > 0
        (0 when there are none).
      tolerance: the rule applied, in words.
      passed: whether every element is within tolerance.
      note: extra facts (e.g. ties, excluded elements).
      floor: for a training-trajectory quantity, its noise floor: max |perturbed reference -
        reference| (`floor_check`); None for the others.
    """
    name: str
    max_abs: float
    max_rel: float
    tolerance: str
    passed: bool
    note: str = ''
    floor: Optional[float] = None


def _diffs(ours, ref):
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return None, None, None
    diff = np.abs(ours - ref)
    nonzero = np.abs(ref) > 0
    max_rel = float((diff[nonzero] / np.abs(ref[nonzero])).max()) if nonzero.any() else 0.0
    return diff, float(diff.max()) if diff.size else 0.0, max_rel


def compare(name: str, ours, ref, *, atol: float, rtol: float = 0.0,
            scale_atol_by_ref_max: bool = False, mask: Optional[np.ndarray] = None,
            note: str = '') -> Check:
    """Element-wise |ours - ref| <= atol' + rtol * |ref|.

    Args:
      atol, rtol: the tolerance; with `scale_atol_by_ref_max`, atol' = atol * max|ref| (for
        quantities such as gradients whose scale varies by orders of magnitude).
      mask: optional boolean array; only True elements are compared (the others are counted in
        the note by the caller).
    """
    diff, max_abs, max_rel = _diffs(ours, ref)
    if diff is None:
        return Check(name, float('nan'), float('nan'), 'shapes must match', False,
                     f'shape {np.shape(ours)} vs {np.shape(ref)}')
    ref = np.asarray(ref, np.float64)
    scale = float(np.abs(ref).max()) if scale_atol_by_ref_max and ref.size else 1.0
    bound = atol * scale + rtol * np.abs(ref)
    ok = diff <= bound
    if mask is not None:
        ok = ok | ~mask
        if mask.any():
            max_abs = float(diff[mask].max())
    rule = (f'|d| <= {atol:g}' + (' * max|ref|' if scale_atol_by_ref_max else '')
            + (f' + {rtol:g} |ref|' if rtol else ''))
    return Check(name, max_abs, max_rel, rule, bool(ok.all()), note)


def within_bound(name: str, ours, ref, bound: np.ndarray, rule: str, note: str = '') -> Check:
    """Element-wise |ours - ref| <= bound (a per-element tolerance computed by the caller)."""
    diff, max_abs, max_rel = _diffs(ours, ref)
    if diff is None:
        return Check(name, float('nan'), float('nan'), rule, False,
                     f'shape {np.shape(ours)} vs {np.shape(ref)}')
    return Check(name, max_abs, max_rel, rule, bool((diff <= bound).all()), note)


def exact(name: str, ours, ref, note: str = '') -> Check:
    """Equality (for integer structures, counts and rounded metrics)."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    same = ours.shape == ref.shape and bool(np.array_equal(ours, ref))
    diff, max_abs, max_rel = _diffs(ours, ref) if ours.shape == ref.shape else (None, np.nan, np.nan)
    return Check(name, max_abs, max_rel, 'equal', same, note)


def metrics_check(name: str, ours: dict, ref: dict, atol: float, note: str = '') -> Check:
    keys = sorted(ref)
    if sorted(ours) != keys:
        return Check(name, float('nan'), float('nan'), 'same keys', False,
                     f'keys {sorted(ours)} vs {keys}')
    return compare(name, [ours[k] for k in keys], [ref[k] for k in keys], atol=atol, note=note)


# Training-trajectory quantities (epoch losses, metrics, parameters after whole epochs) are
# allowed this multiple of their noise floor: how far the reference's own run moves when its
# initial weights move by one ulp (docs/parity.md).
FLOOR_MULTIPLE = 10.0


def floor_check(name: str, ours, ref, perturbed, *, minimum: float,
                multiple: float = FLOOR_MULTIPLE, note: str = '') -> Check:
    """A training-trajectory quantity against its measured noise floor.

    floor = max |perturbed - ref|, where `perturbed` is the same quantity from the reference
    trained again, on the same batches, from its initial weights moved one ulp; passes when
    max |ours - ref| <= max(multiple * floor, minimum).

    Args:
      ours, ref, perturbed: the quantity (scalars or arrays of one shape) on the three runs.
      minimum: the smallest bound, for quantities whose floor can be 0 (e.g. rounded metrics
        of a perturbed run that ranks identically): the analytic tolerance of the same quantity
        computed once from identical inputs.
    """
    diff, max_abs, max_rel = _diffs(ours, ref)
    floor_diff, floor, _ = _diffs(perturbed, ref)
    if diff is None or floor_diff is None:
        return Check(name, float('nan'), float('nan'), 'shapes must match', False,
                     f'shapes {np.shape(ours)}, {np.shape(ref)}, {np.shape(perturbed)}')
    bound = max(multiple * floor, minimum)
    rule = f'|d| <= {bound:.3g} (' + (f'{multiple:g} floor)' if multiple * floor >= minimum
                                       else 'minimum)')
    return Check(name, max_abs, max_rel, rule, max_abs <= bound, note, floor=floor)


def floor_metrics_check(name: str, ours: dict, ref: dict, perturbed: dict, *, minimum: float,
                        multiple: float = FLOOR_MULTIPLE) -> Check:
    """`floor_check` of metric dicts ({'recall@10': ...}), which must have the same keys."""
    keys = sorted(ref)
    if sorted(ours) != keys or sorted(perturbed) != keys:
        return Check(name, float('nan'), float('nan'), 'same keys', False,
                     f'keys {sorted(ours)}, {keys}, {sorted(perturbed)}')
    return floor_check(name, [ours[k] for k in keys], [ref[k] for k in keys],
                       [perturbed[k] for k in keys], minimum=minimum, multiple=multiple)


def report(checks: List[Check]) -> str:
    """The table printed by the parity command: max abs and max rel are ours against the
    reference; floor, for the training-trajectory quantities, the perturbed reference against
    the reference."""
    width = max(len(c.name) for c in checks)
    lines = [f'{"quantity":{width}s}  {"max abs":>10s}  {"max rel":>10s}  {"floor":>10s}  '
             f'{"tolerance":28s}  result',
             '-' * (width + 76)]
    for c in checks:
        floor = f'{c.floor:10.3g}' if c.floor is not None else ' ' * 10
        lines.append(f'{c.name:{width}s}  {c.max_abs:10.3g}  {c.max_rel:10.3g}  {floor}  '
                     f'{c.tolerance:28s}  {"PASS" if c.passed else "FAIL"}'
                     + (f'  ({c.note})' if c.note else ''))
    failed = sum(not c.passed for c in checks)
    lines.append(f'{len(checks) - failed} passed, {failed} failed')
    return '\n'.join(lines)
