"""The model registry: `config.model_name` -> the model's `base.Model`.

One explicit table; adding a model is one module under this folder and one line here.
"""
from lirdrec_jax.models import base, cm3, dgvae, freedom, lirdrec, mllmrec

REGISTRY = {
    'lirdrec': lirdrec.MODEL,
    'freedom': freedom.MODEL,
    'cm3': cm3.MODEL,
    'mllmrec': mllmrec.MODEL,
    'dgvae': dgvae.MODEL,
}


def get_model(name: str) -> base.Model:
    """The registered model `name`; an unknown name is an error listing the registered ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f'config field model_name = {name!r}; expected one of the registered '
                         f'models: {", ".join(sorted(REGISTRY))}') from None
