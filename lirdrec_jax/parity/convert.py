"""Weights between a PyTorch reference's `state_dict` and our parameter pytree, both ways.

Each model's parity module owns its name table (`table`): reference key -> (our parameter
path, whether the tensor is transposed: PyTorch's Linear weight is (out, in), a Flax kernel
(in, out)), and its reference-only feature copies (`feature_keys`: reference key -> 'image' or
'text', tensors that the reference registers but we do not hold, e.g. LIRDRec's unused
feature tables; importing checks that they equal our features, exporting fills them from the
features so that the reference loads our state_dict with strict=True). Conversions are plain
numpy: no torch import is needed here.
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np



class ConversionError(ValueError):
    """A key is unknown or missing, or a shape does not match; the message names the key."""


def to_numpy(value) -> np.ndarray:
    if hasattr(value, 'detach'):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value, np.float32)


def _get(tree: Mapping, path: Tuple[str, ...]):
    for part in path:
        tree = tree[part]
    return tree


def _set(tree: Dict, path: Tuple[str, ...], value) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _flat_paths(tree: Mapping, prefix=()) -> list:
    out = []
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.extend(_flat_paths(v, prefix + (k,)))
        else:
            out.append(prefix + (k,))
    return out


def state_dict_to_params(state_dict: Mapping[str, Any], template: Mapping,
                         features: Optional[Mapping[str, np.ndarray]] = None, *,
                         table: Mapping, feature_keys: Mapping[str, str]) -> Dict:
    """Reference state_dict -> our params, checked against `template` (our initialised params).

    Args:
      state_dict: reference key -> tensor or array (a live model's `state_dict()` or a loaded
        `.pt`).
      template: our parameter pytree with the expected structure and shapes.
      features: optional {'image': (n_items, d_v), 'text': (n_items, d_t)} our features; when
        given, the reference's unused feature copies must equal them (atol 1e-6).
      table, feature_keys: the model's name table and reference-only feature copies.

    Returns:
      A new parameter pytree of float32 numpy arrays.

    Raises:
      ConversionError: unknown key, missing key, or shape mismatch (named).
    """
    known = set(table) | set(feature_keys)
    unknown = sorted(set(state_dict) - known)
    if unknown:
        raise ConversionError(f'unknown reference key(s) {unknown}; known keys: {sorted(known)}')
    missing = sorted(set(table) - set(state_dict))
    if missing:
        raise ConversionError(f'reference state_dict lacks key(s) {missing}')
    params: Dict = {}
    for ref_key, (path, transpose) in table.items():
        value = to_numpy(state_dict[ref_key])
        value = value.T if transpose else value
        try:
            expected = tuple(np.shape(_get(template, path)))
        except KeyError:
            raise ConversionError(f'our parameters have no {"/".join(path)} for reference key '
                                  f'{ref_key!r}') from None
        if value.shape != expected:
            raise ConversionError(f'shape mismatch for reference key {ref_key!r}: '
                                  f'{to_numpy(state_dict[ref_key]).shape} (as {value.shape} '
                                  f'after transpose={transpose}), ours {"/".join(path)} is '
                                  f'{expected}')
        _set(params, path, value)
    unmapped = sorted('/'.join(p) for p in _flat_paths(template)
                      if not any(p == path for path, _ in table.values()))
    if unmapped:
        raise ConversionError(f'our parameters {unmapped} have no reference key')
    if features is not None:
        for ref_key, name in feature_keys.items():
            if ref_key in state_dict:
                ref = to_numpy(state_dict[ref_key])
                if ref.shape != features[name].shape or not np.allclose(ref, features[name],
                                                                          atol=1e-6):
                    raise ConversionError(f'reference key {ref_key!r} does not hold our {name} '
                                          f'features (shape {ref.shape} vs '
                                          f'{features[name].shape})')
    return params


def load_state_dict_file(path) -> Dict[str, np.ndarray]:
    """A reference state_dict saved with `torch.save(model.state_dict(), path)`, as numpy."""
    import torch
    state = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(state, Mapping):
        raise ConversionError(f'{path} holds a {type(state).__name__}, expected a state_dict '
                              '(a mapping of parameter names to tensors)')
    return {k: to_numpy(v) for k, v in state.items()}


def params_to_state_dict(params: Mapping, features: Optional[Mapping[str, np.ndarray]], *,
                         table: Mapping, feature_keys: Mapping[str, str]
                         ) -> Dict[str, np.ndarray]:
    """Our params -> a reference state_dict of numpy arrays (wrap with torch.from_numpy).

    Args:
      params: our parameter pytree.
      features: {'image': ..., 'text': ...} to fill the reference's unused feature copies
        (None when `feature_keys` is empty).
      table, feature_keys: as in `state_dict_to_params`.
    """
    out = {}
    for ref_key, (path, transpose) in table.items():
        try:
            value = np.asarray(_get(params, path), np.float32)
        except KeyError:
            raise ConversionError(f'our parameters lack {"/".join(path)} (reference key '
                                  f'{ref_key!r})') from None
        out[ref_key] = np.ascontiguousarray(value.T if transpose else value)
    for ref_key, name in feature_keys.items():
        out[ref_key] = np.asarray(features[name], np.float32)
    return out


def adam_state_from_torch(optimizer_state: Mapping, param_names: list, template: Mapping, *,
                          table: Mapping, feature_keys: Mapping[str, str]) -> dict:
    """torch.optim.Adam state (by parameter index) -> {'count', 'mu', 'nu'} in our layout.

    Args:
      optimizer_state: `optimizer.state_dict()['state']`, keyed by the index of the parameter
        in `model.parameters()` order.
      param_names: the reference keys in `model.named_parameters()` order.
      template: our parameter pytree (structure and shapes).
      table, feature_keys: as in `state_dict_to_params`.

    Returns:
      {'count': int, 'mu': params-shaped, 'nu': params-shaped}; parameters without state
      (never updated, e.g. the unused feature copies) are skipped, our parameters without a
      reference moment get zeros.
    """
    mu = {}
    nu = {}
    count = 0
    for index, name in enumerate(param_names):
        state = optimizer_state.get(index)
        if name in feature_keys or state is None:
            continue
        path, transpose = table[name]
        m, v = to_numpy(state['exp_avg']), to_numpy(state['exp_avg_sq'])
        _set(mu, path, m.T if transpose else m)
        _set(nu, path, v.T if transpose else v)
        count = max(count, int(to_numpy(state['step'])))
    for path in _flat_paths(template):
        if _path_missing(mu, path):
            shape = np.shape(_get(template, path))
            _set(mu, path, np.zeros(shape, np.float32))
            _set(nu, path, np.zeros(shape, np.float32))
    return {'count': count, 'mu': mu, 'nu': nu}


def _path_missing(tree, path) -> bool:
    try:
        _get(tree, path)
        return False
    except KeyError:
        return True
