"""An HTML report of a search read from its MLflow parent and child runs: the trials table, learning-rate
scatter, FID curves, the families' box plot and the best samples (`python -m gan_tune.report` draws it).
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID  # noqa: E402

from gan_tune.quality.measures import DIVERGED_FID  # noqa: E402
from gan_tune.tracking.parent_run import EDGE_TAG, RESCORED_TAG, rescored_name  # noqa: E402
from gan_tune.tracking.store import (
    DEFAULT_EXPERIMENT,
    is_outage,
    open_client,
    store_errors,
    using_tracking_uri,
)
from gan_tune.training.artifacts import SAMPLES, grid_name  # noqa: E402
from gan_tune.training.config import WARN_ABOVE, WARN_BELOW, ConfigError, first_line

TOP_TRIALS = 5  # curves per plot: more become unreadable
TABLE_METRICS = ("fid", "is", "coverage", "d_acc", "loss_d", "loss_g")
PLOT_DPI = 90
plt.rcParams.update({"font.size": 11, "axes.titlesize": 12})


def find_parent(client: MlflowClient, experiment: str | None, parent_run: str | None) -> mlflow.entities.Run:
    """The given parent run, else the newest search run (a run without a parent) of the experiment."""
    if parent_run:
        try:
            return client.get_run(parent_run)
        except MlflowException as err:
            if is_outage(err):  # a store that failed is not a missing run; store_errors names it
                raise
            raise ConfigError("--parent-run", f"{parent_run}: no such run") from None
    name = experiment or DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(name)
    if found is None:
        raise ConfigError("--experiment", f"{name}: no such experiment")
    runs = client.search_runs([found.experiment_id], "tags.run_kind = 'search'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        raise ConfigError("--experiment", f"{name}: holds no search run")
    return runs[0]


def load_trials(client: MlflowClient, parent: mlflow.entities.Run) -> pd.DataFrame:
    """One row per child run, sorted by best FID over its epochs (the search's choice; unscored last).

    `best_fid` is the lowest finite FID below DIVERGED_FID; `diverged` marks trials that ended diverged.
    """
    frame = mlflow.search_runs([parent.info.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'",
                               run_view_type=mlflow.entities.ViewType.ACTIVE_ONLY)
    if frame.empty:
        raise ConfigError("--parent-run", f"{parent.info.run_id}: has no trial runs")
    for key in ("metrics.fid", "metrics.time_total_s", "tags.stop_reason", "params.model", "tags.trial_id"):
        if key not in frame:
            frame[key] = np.nan
    fid = histories(client, list(frame["run_id"]), "fid")
    frame["best_fid"] = [fid[r][fid[r] < DIVERGED_FID].min() if r in fid else np.nan for r in frame["run_id"]]
    frame["diverged"] = (frame["tags.stop_reason"] == "diverged") | (frame["metrics.fid"] >= DIVERGED_FID)
    for key in ("lr_d", "lr_g"):
        frame[key] = rates_at_best(client, frame, fid, key)
    frame.attrs["fid_history"] = fid
    return frame.sort_values("best_fid", na_position="last").reset_index(drop=True)


def rates_at_best(client: MlflowClient, frame: pd.DataFrame, fid: dict[str, pd.Series], key: str) -> list[float]:
    """The rate each trial's optimiser used at its best-FID epoch (else its last epoch), from the reported metric.

    Not the run's params: a ttur trial searches lr_ratio (lr_d = lr_g * lr_ratio, no lr_d param), and under PBT
    a trial's rates change as it explores; the trainable reports the rates in use every epoch."""
    rates = histories(client, list(frame["run_id"]), key)
    found = []
    for run_id in frame["run_id"]:
        series, scores = rates.get(run_id), fid.get(run_id)
        if series is None:
            found.append(np.nan)
            continue
        finite = scores[scores < DIVERGED_FID] if scores is not None else pd.Series(dtype=float)
        epoch = finite.idxmin() if len(finite) else series.index[-1]
        found.append(float(series.get(epoch, series.iloc[-1])))
    return found


def searched_params(trials: pd.DataFrame) -> list[str]:
    """Params whose value differs between trials (the search chose them; seed left out), family and rates first."""
    varied = [c for c in trials.columns if c.startswith("params.") and c != "params.seed"
              and trials[c].nunique(dropna=True) > 1]
    first = [c for c in ("params.model", "params.lr_d", "params.lr_g") if c in varied]
    return first + sorted(set(varied) - set(first))


def trials_table(trials: pd.DataFrame) -> str:
    """The trials as an HTML table: name, searched params, final metrics, status, stop reason, time."""
    columns = {"tags.mlflow.runName": "trial", **{c: c.removeprefix("params.") for c in searched_params(trials)}}
    columns["best_fid"] = "best fid"
    columns.update({f"metrics.{m}": m for m in TABLE_METRICS if f"metrics.{m}" in trials})
    columns.update({"status": "status", "tags.stop_reason": "stop reason", "metrics.time_total_s": "time (s)"})
    table = trials[list(columns)].rename(columns=columns)
    for name in table.columns:
        table[name] = table[name].map(format_cell)
    return f'<div class=scroll>{table.to_html(index=False, classes="trials", border=0, na_rep="–")}</div>'


def format_cell(value: object) -> str:
    """Numbers (also params, which MLflow stores as strings) to 4 significant digits."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "–" if value is None else str(value)
    if np.isnan(number):
        return "–"
    if number >= DIVERGED_FID:
        return "diverged"
    return f"{number:.4g}"


def figure_html(fig: plt.Figure, alt: str) -> str:
    """A figure as an inline PNG <img>, so the report is one file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PLOT_DPI, bbox_inches="tight")
    plt.close(fig)
    return png_html(buffer.getvalue(), alt)


def png_html(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def lr_scatter(trials: pd.DataFrame) -> str | None:
    """lr_d x lr_g (in use at each trial's best epoch) on log axes, coloured by best FID; trials never scored below
    DIVERGED_FID as grey crosses."""
    lr_d, lr_g = trials["lr_d"], trials["lr_g"]
    if lr_d.isna().all() or lr_g.isna().all():
        return None
    fid = trials["best_fid"]
    scored = fid.notna()
    fig, ax = plt.subplots(figsize=(7, 5.2))
    if (~scored).any():
        ax.scatter(lr_d[~scored], lr_g[~scored], marker="x", color="0.45", s=60, label="no finite FID")
    if scored.any():
        points = ax.scatter(lr_d[scored], lr_g[scored], c=fid[scored], cmap="viridis_r", s=90, edgecolor="k",
                            norm=fid_norm(fid[scored]))
        fig.colorbar(points, ax=ax, label="best FID (lower is better)", format="%.0f")
        best = fid[scored].idxmin()
        ax.scatter(lr_d[best], lr_g[best], marker="o", s=320, facecolor="none", edgecolor="red", linewidth=2,
                   label=f"best: FID {fid[best]:.4g}")
    ax.set(xscale="log", yscale="log", xlabel="lr_d", ylabel="lr_g",
           title="Learning rates at each trial's best epoch, coloured by best FID")
    for axis, values in ((ax.xaxis, lr_d), (ax.yaxis, lr_g)):
        label_log_axis(axis, values)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=9)
    return figure_html(fig, "lr_d x lr_g coloured by FID")


def label_log_axis(axis: matplotlib.axis.Axis, values: pd.Series) -> None:
    """Ticks labelled 2e-04: at 1, 2 and 5 per decade when the values span under 1.5 decades, else decades."""
    span = np.log10(values.max() / values.min()) if values.min() > 0 else 0.0
    axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0) if span < 1.5 else (1.0,)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:.0e}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def fid_norm(fid: pd.Series) -> Normalize:
    """A log colour scale when FIDs span more than a decade, else a linear one."""
    low, high = float(fid.min()), float(fid.max())
    high = max(high, low * 1.01)
    return LogNorm(low, high) if high / low > 10 else Normalize(low, high)


def histories(client: MlflowClient, run_ids: list[str], key: str) -> dict[str, pd.Series]:
    """run id -> the metric's values by epoch (MLflow step)."""
    found = {}
    for run_id in run_ids:
        points = client.get_metric_history(run_id, key)
        if points:
            found[run_id] = pd.Series({p.step: p.value for p in points}).sort_index()
    return found


def curves(client: MlflowClient, trials: pd.DataFrame) -> str:
    """FID and D accuracy per epoch of the top trials, the 30-80 % D-accuracy band shaded."""
    top = trials[trials["best_fid"].notna()].head(TOP_TRIALS)
    names = dict(zip(top["run_id"], top["tags.mlflow.runName"]))
    fig, (ax_fid, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.6), constrained_layout=True)
    for run_id in names:
        series = trials.attrs["fid_history"][run_id]
        series = series[series < DIVERGED_FID]  # a diverged epoch's sentinel would flatten every other curve
        ax_fid.plot(series.index, series.values, marker="o", label=names[run_id])
    for run_id, series in histories(client, list(names), "d_acc").items():
        ax_acc.plot(series.index, series.values, marker="o", label=names[run_id])
    ax_acc.axhspan(WARN_BELOW, WARN_ABOVE, color="tab:green", alpha=0.12,
                   label=f"D accuracy {WARN_BELOW:.0%}-{WARN_ABOVE:.0%}")
    ax_fid.set(title=f"FID per epoch, top {len(names)} trials", xlabel="epoch", ylabel="FID (lower is better)")
    if not top.empty and top["best_fid"].max() > 10 * top["best_fid"].min():
        ax_fid.set_yscale("log")
    ax_acc.set(title="D accuracy per epoch", xlabel="epoch", ylabel="D accuracy", ylim=(0, 1))
    for ax in (ax_fid, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8, loc="best")
    return figure_html(fig, "FID and D accuracy per epoch of the top trials")


def family_boxplot(trials: pd.DataFrame) -> str | None:
    """Best FID per model family, for spaces that searched the family; trials that never scored are counted."""
    if trials["params.model"].nunique(dropna=True) < 2:
        return None
    families = sorted(trials["params.model"].dropna().unique())
    data, labels = [], []
    for family in families:
        rows = trials[trials["params.model"] == family]
        scored = rows["best_fid"].dropna()
        data.append(scored.to_numpy())
        labels.append(f"{family}\n{len(scored)} scored, {int(rows['diverged'].sum())} diverged")
    fig, ax = plt.subplots(figsize=(7, 5.2))
    ax.boxplot(data, tick_labels=labels, showmeans=True)
    for i, values in enumerate(data, start=1):  # the points too: families have few trials
        ax.scatter(np.full(len(values), i), values, color="tab:blue", alpha=0.6, s=20, zorder=3)
    ax.set(ylabel="best FID (lower is better)", title="FID per model family")
    values = np.concatenate(data)
    if len(values) and values.max() > 10 * values.min():  # log only when the FIDs span more than a decade
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:.0f}"))
    ax.grid(alpha=0.3, axis="y", which="both")
    return figure_html(fig, "FID per model family")


def best_samples(client: MlflowClient, trials: pd.DataFrame) -> tuple[str, int] | None:
    """(<img>, epoch): the best trial's sample grid from its best epoch, else its final grid, from MLflow."""
    best = trials[trials["best_fid"].notna()].head(1)
    if best.empty:
        return None
    run_id = best["run_id"].iloc[0]
    history = trials.attrs["fid_history"][run_id]
    epoch = int(history[history < DIVERGED_FID].idxmin())
    names = {a.path for a in client.list_artifacts(run_id, SAMPLES)}
    wanted = f"{SAMPLES}/{grid_name(epoch)}"
    path, epoch = (wanted, epoch) if wanted in names else ("final_grid.png", int(history.index.max()))
    with tempfile.TemporaryDirectory() as folder:
        try:
            data = Path(client.download_artifacts(run_id, path, folder)).read_bytes()
        except (MlflowException, OSError):  # a trial whose files never reached MLflow
            return None
    return png_html(data, f"samples of {best['tags.mlflow.runName'].iloc[0]}"), epoch


def best_line(parent: mlflow.entities.Run, trials: pd.DataFrame) -> str:
    """The search's best trial as the parent run recorded it (its generator is the logged model)."""
    tags = parent.data.tags
    if "best.trial_id" not in tags:
        return "– (the search logged no best trial)"
    best = tags.get("best.member") or tags["best.trial_id"]  # a cohort trial's best member has the run
    names = trials.loc[trials["tags.trial_id"] == best, "tags.mlflow.runName"]
    name = names.iloc[0] if len(names) else best
    fid = parent.data.metrics.get("fid", float("nan"))
    if RESCORED_TAG in tags:  # the search scored its finalists again on more samples and kept the best by that
        rescored = parent.data.metrics.get(rescored_name("fid", int(tags[RESCORED_TAG])), float("nan"))
        fid = f"{format_cell(rescored)} on {tags[RESCORED_TAG]} samples ({format_cell(fid)} when reported)"
    else:
        fid = format_cell(fid)
    return f"{name}: FID {fid} at epoch {tags.get('best.epoch', '?')} (logged as the generator model)"


def header_html(parent: mlflow.entities.Run, trials: pd.DataFrame) -> str:
    """Title, the space's description and the search's tags, the outcome counts and the best trial."""
    tags = parent.data.tags
    facts = {key: tags.get(key, "–") for key in ("space", "scheduler", "search_alg", "data_source", "gan_tune_version")}
    facts["git commit"] = tags.get("mlflow.source.git.commit", "–")[:10]
    facts["trials"] = str(len(trials))
    facts["outcomes"] = ", ".join(f"{k}: {v}" for k, v in trials["tags.stop_reason"].fillna("running").value_counts().items())
    facts["best"] = best_line(parent, trials)
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items())
    note = html.escape(tags.get("mlflow.note.content", ""))
    edges = "".join(f"<p class=warn>warning: {html.escape(line)}</p>" for line in tags.get(EDGE_TAG, "").splitlines())
    return (f"<h1>Search {html.escape(parent.info.run_name)}</h1><p class=note>{note}</p>"
            f"<p class=small>parent run {parent.info.run_id}, experiment {parent.info.experiment_id}</p>"
            f"<table class=facts>{rows}</table>{edges}")


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1350px}
h1{font-size:24px;margin-bottom:4px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
.note{max-width:900px} .small{color:#777;font-size:12px} .warn{color:#a40;font-weight:600}
table{border-collapse:collapse;font-size:13px} th,td{padding:3px 8px;text-align:right}
table.facts th{text-align:left;color:#555} table.facts td{text-align:left}
table.trials tr:nth-child(even){background:#f3f3f3} table.trials th{background:#e4e4e4;position:sticky;top:0}
.scroll{overflow-x:auto} .row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start} img{max-width:100%}
.grid img{width:300px;image-rendering:pixelated}"""


def build_report(client: MlflowClient, parent: mlflow.entities.Run) -> str:
    """The whole report as one HTML string."""
    trials = load_trials(client, parent)
    sections = [header_html(parent, trials), "<h2>Trials, sorted by their best FID</h2>", trials_table(trials)]
    figures = [f for f in (lr_scatter(trials), family_boxplot(trials)) if f]
    samples = best_samples(client, trials)
    if samples:
        figures.append(f"<div class=grid><b>Best trial's samples, epoch {samples[1]}</b><br>{samples[0]}</div>")
    sections += ["<h2>Learning rates, model families and the best samples</h2>", f"<div class=row>{''.join(figures)}</div>",
                 "<h2>Training curves of the top trials</h2>", curves(client, trials)]
    title = html.escape(f"gan_tune report: {parent.info.run_name}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{title}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(sections)}</body></html>")


def write_report(uri: str, experiment: str | None, parent_run: str | None, out: str | Path) -> Path:
    """Build the report, write it to OUT/<parent run name>.html, log it on the parent run; returns the path."""
    with store_errors(uri):
        client = open_client(uri)
        parent = find_parent(client, experiment, parent_run)
        path = Path(out) / f"{parent.info.run_name}.html"
        with using_tracking_uri(uri):  # mlflow.search_runs reads the global URI
            text = build_report(client, parent)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as err:
            raise ConfigError("--out", f"{out}: cannot write the report ({first_line(err)})") from None
        client.log_artifact(parent.info.run_id, str(path), "report")
    return path
