"""`pipeline scaling sweep` on real Ray, DeepSpeed and MLflow: a small grid trains, every
run lands in the sweep's experiment, the fit reads them back, a second start skips them."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, SMOKE, TINY_OVERRIDES

from pipeline.cli import main


def _ran_runs(uri: str, sweep: str = "tiny") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny-sweep")
    return client.search_runs([experiment.experiment_id], "tags.stage = 'pretrain_gpt' and tags.status = 'ran' "
                              f"and tags.sweep = '{sweep}' and attributes.status = 'FINISHED'")


def test_sweep_trains_the_grid_and_resumes(ray_cluster, tmp_path, capsys):
    sweep = {
        "name": "tiny", "base": str(SMOKE), "experiment": "tiny-sweep", "evaluations": 2,
        "overrides": TINY_OVERRIDES + ["pretrain_gpt.train.num_workers=1", "pretrain_gpt.train.zero_stage=0",
                                       "pretrain_gpt.train.eval_samples=128"],
        "sizes": [{"n_layer": 1, "n_head": 2, "d_model": 16}, {"n_layer": 1, "n_head": 2, "d_model": 32},
                  {"n_layer": 2, "n_head": 2, "d_model": 48}],
        "tokens": [20480, 61440],  # 10 and 30 steps of 32 x 64 tokens
        "lr_reference_width": 32,
        "holdout": {"size": {"n_layer": 2, "n_head": 2, "d_model": 64}, "budget": 61440,
                    "overrides": ["pretrain_gpt.train.micro_batch_size=16", "pretrain_gpt.train.grad_accum=2"]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    workdir = tmp_path / "work"
    uri = f"sqlite:///{workdir}/mlflow.db"

    assert main(["scaling", "sweep", str(path), "--workdir", str(workdir)]) == 0
    runs = _ran_runs(uri)
    assert len(runs) == 6
    by_size: dict[int, dict[float, float]] = {}
    for run in runs:
        by_size.setdefault(int(run.data.params["params_non_embedding"]), {})[run.data.metrics["tokens"]] = run.data.metrics["val_loss"]
    assert len(by_size) == 3 and all(sorted(losses) == [20480.0, 61440.0] for losses in by_size.values())
    assert all(losses[61440.0] < losses[20480.0] for losses in by_size.values())  # more data, lower validation loss

    capsys.readouterr()
    assert main(["scaling", "fit", "--experiment", "tiny-sweep", "--sweep", "tiny", "--tracking-uri", uri,
                 "--bootstrap", "5", "--json", "--plots", str(tmp_path / "plots")]) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["chinchilla"]["E"] > 0 and "kaplan" in fitted

    # Started again: every point is a cache hit, no run trains twice.
    assert main(["scaling", "sweep", str(path), "--workdir", str(workdir)]) == 0
    assert "cached" in capsys.readouterr().out and len(_ran_runs(uri)) == 6

    # The held-out run: tagged apart from the sweep, compared with the law fitted to the sweep alone.
    assert main(["scaling", "sweep", str(path), "--workdir", str(workdir), "--holdout", "--bootstrap", "5"]) == 0
    report = capsys.readouterr().out
    [holdout] = _ran_runs(uri, sweep="tiny-holdout")
    assert len(_ran_runs(uri)) == 6 and int(holdout.data.params["params_non_embedding"]) > max(by_size)
    measured = holdout.data.metrics["val_loss"]
    predicted = float(re.search(r"predicted (\S+)", report).group(1))
    assert f"measured {measured:.4f}" in report and f"{100 * (predicted / measured - 1):+.1f}%" in report


def test_processes_opening_one_new_sqlite_store_take_turns(tmp_path):
    """A sweep's runs open the SQLite store at once; MLflow's own schema migration
    races (`duplicate column name`, `table ... already exists`) unless they take turns."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = ("import sys; from pipeline import tracking; "
            "tracking.ensure_experiment(sys.argv[1], 'e', sys.argv[2]); print('opened')")
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(6)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    failed = [out for p, out in zip(procs, outputs) if p.returncode != 0]
    assert not failed, failed[0][-2000:]
    assert all(out.strip().endswith("opened") for out in outputs)


def test_a_second_run_in_one_process_logs_to_its_own_workdir(tmp_path):
    """MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI; the pipeline must not then
    take the first run's store for the user's choice (a held-out run once logged into
    another test's database)."""
    import os

    from pipeline import tracking

    assert "MLFLOW_TRACKING_URI" not in os.environ or pytest.skip("MLFLOW_TRACKING_URI is set by the user")
    first = tracking.tracking_uri(None, str(tmp_path / "a"))
    tracking.ensure_experiment(first, "e", str(tmp_path / "a"))
    second = tracking.tracking_uri(None, str(tmp_path / "b"))
    assert first != second and second.endswith(f"{tmp_path}/b/mlflow.db")
