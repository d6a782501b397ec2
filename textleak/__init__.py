"""textleak: measure how much private text leaks through the gradients a training client shares.

The flow: ``load_model`` -> ``simulate_client`` (the victim) -> ``Update`` -> ``get_attack(...).reconstruct``
-> ``Reconstruction`` -> ``score_batch`` (the evaluator joins reconstruction and ground truth).
"""

from textleak.attacks import ATTACKS, Reconstruction, get_attack
from textleak.client import GroundTruth, simulate_client
from textleak.defenses import DEFENSES, parse_defense
from textleak.defenses.client import defended_client
from textleak.metrics import score_batch
from textleak.models import LoadedModel, load_model
from textleak.update import Update

__version__ = "0.1.0"

__all__ = [
    "ATTACKS",
    "DEFENSES",
    "GroundTruth",
    "LoadedModel",
    "Reconstruction",
    "Update",
    "__version__",
    "defended_client",
    "get_attack",
    "load_model",
    "parse_defense",
    "score_batch",
    "simulate_client",
]
