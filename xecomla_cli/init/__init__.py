"""MLA initialisation from a pretrained model's attention: the paper's data-free SVD (``paper``)
and the data-aware methods (``methods``), chosen once in ``convert``; ``run`` is init-svd."""

from .convert import convert_layer, convert_model
from .spec_builder import build_spec, parse_layers

__all__ = ["build_spec", "convert_layer", "convert_model", "parse_layers"]
