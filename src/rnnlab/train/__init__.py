"""Training: the trainer, checkpoints, multi-process training, evaluation, FLOP accounting, plots."""
from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from .evaluate import evaluate, loss_by_position, plot_loss_by_position, plot_losses
from ..flops import matmul_peak, model_flops_per_token
from .trainer import NonFiniteLossError, RunExistsError, TrainConfig, lr_at, train

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint", "evaluate",
           "loss_by_position", "plot_loss_by_position", "plot_losses", "model_flops_per_token", "matmul_peak",
           "NonFiniteLossError", "RunExistsError", "TrainConfig", "lr_at", "train"]
