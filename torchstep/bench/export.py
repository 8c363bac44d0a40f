"""Optional exports of a results database to TensorBoard or MLflow.

Exports read the finished trials from SQLite after (or while) a sweep runs, and write each trial's
curve in one batch — training processes never talk to a tracking backend, so exports cannot slow them
(synchronous per-step MLflow logging costs 10–15 % of a small GPT step, benchmarking.md §7.2).
"""
from __future__ import annotations

import json
from pathlib import Path

from .store import connect, trials


def _points(db: Path, tid: str) -> list[tuple[int, str, float]]:
    con = connect(db)
    try:
        return list(con.execute("SELECT step, name, value FROM metrics WHERE trial_id = ? ORDER BY step", (tid,)))
    finally:
        con.close()


def to_tensorboard(out: str | Path) -> Path:
    """One event directory per trial under ``out/tensorboard/<task>/<arm>/lr<lr>-seed<seed>``."""
    from torch.utils.tensorboard import SummaryWriter
    out = Path(out)
    db = out / "results.sqlite"
    root = out / "tensorboard"
    for row in trials(db):
        writer = SummaryWriter(str(root / row["task"] / row["arm"] / f"lr{row['lr']:g}-seed{row['seed']}"))
        for step, name, value in _points(db, row["trial_id"]):
            writer.add_scalar(name, value, step)
        writer.add_hparams({"lr": row["lr"], "seed": row["seed"], "arm": row["arm"], "task": row["task"]},
                           {"hparam/final_val": row["final_val"], "hparam/diverged": row["diverged"]},
                           run_name=".")
        writer.close()
    return root


def to_mlflow(out: str | Path, tracking_uri: str | None = None, experiment: str = "torchstep-bench") -> int:
    """One MLflow run per trial (params + batched ``log_batch``) in ``out/mlflow.db`` unless ``tracking_uri``."""
    import mlflow
    from mlflow.entities import Metric, Param
    out = Path(out)
    db = out / "results.sqlite"
    client = mlflow.MlflowClient(tracking_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    rows = trials(db)
    for row in rows:
        run = client.create_run(exp_id, run_name=f"{row['task']}/{row['arm']}/lr{row['lr']:g}/seed{row['seed']}",
                                tags={"trial_id": row["trial_id"]})
        params = [Param(k, str(v)) for k, v in json.loads(row["config"]).items()]
        metrics = [Metric(name, value, int(row["finished"] * 1000), step)
                   for step, name, value in _points(db, row["trial_id"])]
        for i in range(0, max(len(metrics), 1), 1000):      # MLflow caps a batch at 1000 metrics
            client.log_batch(run.info.run_id, metrics=metrics[i:i + 1000], params=params if i == 0 else [])
        client.set_terminated(run.info.run_id)
    return len(rows)
