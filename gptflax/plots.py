"""Plots people would rather see than read: loss and accuracy curves, learning rates (PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses, path: str | Path) -> Path:
    """Training and validation loss against epochs, with tokens seen on a second axis (§5.2)."""
    fig = curves_figure(epochs_seen, tokens_seen, train_losses, val_losses, "loss", "Tokens seen")
    return _save(fig, path)


def plot_values(
    epochs_seen, examples_seen, train_values, val_values, path: str | Path, label: str = "loss"
) -> Path:
    """Train and validation curves of `label` against epochs, with examples seen on a second
    axis, as chapter 6 plots its losses and accuracies (Book §6.7)."""
    fig = curves_figure(
        epochs_seen, examples_seen, train_values, val_values, label, "Examples seen"
    )
    return _save(fig, path)


def curves_figure(epochs_seen, seen, train_values, val_values, label: str, seen_label: str):
    """A figure of train and validation `label` against epochs, `seen_label` on the top axis."""
    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_values, label=f"Training {label}")
    ax1.plot(epochs_seen, val_values, linestyle="-.", label=f"Validation {label}")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel(label.capitalize())
    ax1.legend(loc="best")
    ax2 = ax1.twiny()  # a second x-axis sharing the y-axis
    ax2.plot(seen, train_values, alpha=0)  # invisible: only aligns the ticks
    ax2.set_xlabel(seen_label)
    return fig


def plot_series(x, series: dict[str, list], xlabel: str, ylabel: str, path: str | Path) -> Path:
    """Curves of several named series against x, one line each (log-scaled x when it spans
    more than 100x)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    for name, values in series.items():
        ax.plot(x, values, marker=".", label=name)
    if max(x) > 100 * max(min(x), 1e-12):
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="best")
    return _save(fig, path)


def plot_learning_rate(learning_rates, path: str | Path) -> Path:
    """The learning rate at every step (Appendix D)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(len(learning_rates)), learning_rates)
    ax.set_xlabel("Step")
    ax.set_ylabel("Learning rate")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
