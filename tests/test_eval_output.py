"""Where `collab-agent eval` writes, what it checks before loading models, and its plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_eval_runner import eval_app, one_problem_file
from typer.testing import CliRunner

from collab_agent.evaluation.runner import RECORDS_FILE


def test_an_unknown_policy_is_rejected_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import collab_agent.cli.backends

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("models were loaded before the policy names were checked")

    monkeypatch.setattr(collab_agent.cli.backends, "load_pair", no_loading)
    data = one_problem_file(tmp_path)
    result = CliRunner().invoke(
        eval_app(), ["eval", "--data", str(data), "--models", "tiny", "--policy", "trigreasn"]
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, Exception)
    assert "trigreasn" in str(result.exception)
    assert not isinstance(result.exception, AssertionError)


def test_without_out_the_run_goes_to_a_new_folder_under_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = one_problem_file(tmp_path)
    result = CliRunner().invoke(
        eval_app(),
        [
            "eval",
            "--data", str(data),
            "--models", "tiny",
            "--policy", "small-only",
            "--limit", "1",
            "--budget", "4",
            "--step-max-tokens", "4",
            "--answer-max-tokens", "4",
            "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout)) == {"small-only"}
    (folder,) = (tmp_path / "runs").glob("eval-d-*")
    assert (folder / RECORDS_FILE).exists()
    assert not (tmp_path / "collab-eval").exists()


def test_report_only_needs_the_folder_of_an_earlier_run(tmp_path: Path) -> None:
    data = one_problem_file(tmp_path)
    result = CliRunner().invoke(eval_app(), ["eval", "--data", str(data), "--report-only"])
    assert result.exit_code != 0
    assert "--out" in str(result.exception)


def test_the_plot_legend_sits_outside_the_data(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from collab_agent.evaluation import report

    summary = {
        "small-only": {"small_token_share": 1.0, "accuracy": 0.0},
        "large-only": {"small_token_share": 0.0, "accuracy": 0.0},
        "trigreason": {"small_token_share": 0.5, "accuracy": 0.5},
    }
    captured = []
    original_close = plt.close
    plt.close = lambda fig=None: captured.append(fig)  # type: ignore[assignment,misc]
    try:
        assert report.plot_summary(summary, tmp_path / "p.png") is not None
    finally:
        plt.close = original_close
    (fig,) = captured
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    axes = ax.get_window_extent(renderer)
    assert legend.x0 >= axes.x1  # right of the axes: no point is hidden under it
    original_close(fig)
