"""The model zoo: small models trained by ``robustbench-lite train``, shipped with model cards.

``load_model("mnist5k-cnn-pgd-at")`` checks the weights' sha256 against the card before loading and
the clean accuracy on a fixed sample after; ``list_models()`` lists what ships. ``load_model`` also
takes a user's state dict (+ ``arch``), a TorchScript file or a ``package.module:factory`` reference.
"""
from .architectures import ARCHITECTURES, Normalize, build
from .cards import list_models, normalization_of, parameter_count, read_cards
from .checkpoint import read_state_dict
from .loading import ModelInfo, count_correct, load_model, load_model_with_info

__all__ = ["ARCHITECTURES", "ModelInfo", "Normalize", "build", "count_correct", "list_models",
           "load_model", "load_model_with_info", "normalization_of", "parameter_count", "read_cards",
           "read_state_dict"]
