"""Plots: the axes say what they show (chapter 5 counts tokens, chapter 6 examples)."""

import matplotlib.pyplot as plt
import pytest

from gptflax import plots

pytestmark = pytest.mark.lab6

PNG = b"\x89PNG\r\n\x1a\n"


def test_loss_curves_count_tokens_and_classification_curves_count_examples(tmp_path):
    plots.plot_losses([0, 1], [0, 512], [5.0, 4.0], [5.5, 4.5], tmp_path / "loss.png")
    plots.plot_values([0, 1], [0, 80], [0.7, 0.4], [0.8, 0.5], tmp_path / "cls.png")
    plots.plot_values([0, 1], [0, 80], [0.6, 0.9], [0.5, 0.8], tmp_path / "acc.png", "accuracy")
    assert all((tmp_path / f).read_bytes()[:8] == PNG for f in ("loss.png", "cls.png", "acc.png"))
    fig = plots.curves_figure([0, 1], [0, 80], [0.6, 0.9], [0.5, 0.8], "accuracy", "Examples seen")
    bottom, top = fig.axes
    assert (bottom.get_xlabel(), bottom.get_ylabel(), top.get_xlabel()) == (
        "Epochs", "Accuracy", "Examples seen",
    )  # fmt: skip
    assert [t.get_text() for t in bottom.get_legend().get_texts()] == [
        "Training accuracy", "Validation accuracy",
    ]  # fmt: skip
    plt.close(fig)


def test_chapter_6_loss_plots_say_examples_seen(tmp_path, monkeypatch):
    labels = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: labels.append(fig.axes[1].get_xlabel()))
    plots.plot_values(
        [0, 1], [0, 80], [0.7, 0.4], [0.8, 0.5], tmp_path / "loss.png"
    )  # label "loss"
    plots.plot_losses([0, 1], [0, 512], [5.0, 4.0], [5.5, 4.5], tmp_path / "loss.png")
    assert labels == ["Examples seen", "Tokens seen"]
