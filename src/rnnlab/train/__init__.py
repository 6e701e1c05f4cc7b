"""Training: the trainer, evaluation in bits per byte, plots."""
from .trainer import TrainConfig, evaluate_bpb, plot_losses, train

__all__ = ["TrainConfig", "evaluate_bpb", "plot_losses", "train"]
