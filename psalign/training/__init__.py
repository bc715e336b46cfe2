"""PSA adapter training (``train_psa.py``): configuration, conditioning, data, cache and the Accelerate loop."""

from .config import TrainingConfig, add_training_arguments, config_from_args, load_training_config
from .trainer import NonFiniteLossError, NonFiniteWeightsError, PSATrainer, read_metrics, train

__all__ = [
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "PSATrainer",
    "TrainingConfig",
    "add_training_arguments",
    "config_from_args",
    "load_training_config",
    "read_metrics",
    "train",
]
