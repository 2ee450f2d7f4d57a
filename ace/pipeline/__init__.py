"""The training pipeline (train.py): stages, run report, folding added items into the model."""
