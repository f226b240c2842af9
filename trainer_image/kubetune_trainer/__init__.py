"""The kubetune trainer: runs inside the training pod (or locally) from a TrainerConfig.

`python -m kubetune_trainer --config trainer.json [--mode validate|train]`.
The recipe (`recipe.py`) reads top to bottom: setup, data, model, train, save.
"""

__version__ = "0.1.0"
