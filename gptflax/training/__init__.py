"""Training: the optimizer (`optim`), the jitted step (`step`), the loop over any stream of
batches with actions between steps (`loop`), the book's `fit` on it (`fit`), and a pretraining
run as one record, resumable at any step (`run`)."""

from gptflax.data import Position
from gptflax.training.fit import History, fit, jit_train_step, resume, save_train_checkpoint
from gptflax.training.loop import Every, Hook, Step, train_loop
from gptflax.training.optim import (
    clip_by_global_norm_from,
    make_optimizer,
    warmup_cosine_schedule,
)
from gptflax.training.step import (
    TrainState,
    calc_loss_loader,
    calc_metrics_loader,
    init_train_state,
    train_step,
)

__all__ = [
    "Every", "History", "Hook", "Position", "Step", "TrainState", "calc_loss_loader",
    "calc_metrics_loader", "clip_by_global_norm_from", "fit", "init_train_state",
    "jit_train_step", "make_optimizer", "resume", "save_train_checkpoint", "train_loop",
    "train_step", "warmup_cosine_schedule",
]  # fmt: skip
