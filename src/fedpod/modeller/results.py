"""An experiment's folder: metrics, final weights, and breakpoints to resume from.

    experiments/Experiment_0001/
        rounds.jsonl                  a line per round: each pod's reply and phases, the round's seconds
                                      (fedpod.modeller.history: what `training_replies()` reads)
        metrics.csv                   one row per round and pod: samples, loss, validation metrics, seconds
                                      (grows by a round's rows as it ends; metrics.png, drawn from it,
                                      is rewritten once per `run` call)
        model.safetensors             the latest aggregated parameters
        aggregated/round_0000.safetensors ...  the aggregated parameters of every round (0-based, as
                                      `Experiment.aggregated_params()` keys them); kept on disk, not in
                                      memory, so a long run with a large model costs no more memory
        breakpoints/breakpoint_0003/  state.json, params.safetensors, aggregator.safetensors, plan.py
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.numpy import load_file

from fedpod.aggregation.base import Params
from fedpod.errors import ConfigError
from fedpod.wire.tensors import decode_groups, encode_named, encode_parts, write_tensors

if TYPE_CHECKING:  # pandas and matplotlib load when a figure is drawn
    import pandas as pd

FOLDER_PATTERN = re.compile(r"^Experiment_(\d{4,})$")


def next_experiment_folder(root: Path) -> Path:
    """`Experiment_0001`, or one more than the highest existing number."""
    numbers = [int(m.group(1)) for p in root.glob("Experiment_*") if (m := FOLDER_PATTERN.match(p.name))]
    return root / f"Experiment_{max(numbers, default=0) + 1:04d}"


def latest_experiment(root: Path) -> Path:
    """The highest-numbered `Experiment_NNNN` folder under `root`."""
    folders = sorted((int(m.group(1)), p) for p in root.glob("Experiment_*") if (m := FOLDER_PATTERN.match(p.name)))
    if not folders:
        raise ConfigError(f"no experiment in {root.resolve()}",
                          hint="pass the breakpoint's path, or experiments_root=FOLDER where the experiments are")
    return folders[-1][1]


def save_params(params: Params, path: Path) -> None:
    """A safetensors file that any safetensors reader opens, written without a copy of the model."""
    write_tensors(path, encode_named(params))


def load_params(path: Path) -> Params:
    return dict(load_file(str(path)))


ROUND_FILE = re.compile(r"^round_(\d{4,})\.safetensors$")


def save_aggregated(folder: Path, round_number: int, params: Params) -> Path:
    """The round's file, and `model.safetensors` as a second name for it."""
    path = folder / "aggregated" / f"round_{round_number:04d}.safetensors"
    save_params(params, path)
    second_name(path, folder / "model.safetensors")
    return path


def second_name(source: Path, target: Path) -> None:
    """A hard link (a copy where the file system has none): a 400 MB model is written once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        target.hardlink_to(source)
    except OSError:
        shutil.copyfile(source, target)


def aggregated_files(folder: Path) -> dict[int, Path]:
    found = ((m, p) for p in (folder / "aggregated").glob("round_*.safetensors") if (m := ROUND_FILE.match(p.name)))
    return {int(m.group(1)): p for m, p in sorted(found, key=lambda item: int(item[0].group(1)))}


def write_metrics(folder: Path, replies: dict[int, dict[str, dict[str, Any]]]) -> None:
    """metrics.csv from every round's replies (see `append_metrics`)."""
    rows = [{"round": round_number, "pod": pod, **reply} for round_number, pods in sorted(replies.items())
            for pod, reply in sorted(pods.items())]
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))  # a pod that failed has fewer keys
    with (folder / "metrics.csv").open("w", newline="") as out:
        writer = csv.DictWriter(out, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def append_metrics(folder: Path, round_number: int, replies: dict[str, dict[str, Any]],
                   every_round: Callable[[], dict[int, dict[str, dict[str, Any]]]]) -> None:
    """Add round `round_number`'s rows to metrics.csv. They are appended while the file's
    columns hold them, so a round costs the same after thousands of rounds (rewriting the file
    every round made round 4,000 four times slower than round 50, in benchmarks/soak); a round
    with a new column (a metric first reported) rewrites it once from `every_round()`."""
    path = folder / "metrics.csv"
    rows = [{"round": round_number, "pod": pod, **reply} for pod, reply in sorted(replies.items())]
    columns: list[str] = []
    if path.exists():
        with path.open(newline="") as handle:
            columns = next(csv.reader(handle), [])
    if not columns or any(key not in columns for row in rows for key in row):
        write_metrics(folder, every_round())
        return
    with path.open("a", newline="") as out:
        csv.DictWriter(out, columns, restval="").writerows(rows)


def save_breakpoint(folder: Path, round_number: int, state: dict[str, Any], params_file: Path,
                    aggregator_state: dict[str, Params], plan_source: str | None) -> Path:
    target = folder / "breakpoints" / f"breakpoint_{round_number:04d}"
    target.mkdir(parents=True, exist_ok=True)
    second_name(params_file, target / "params.safetensors")
    write_tensors(target / "aggregator.safetensors", encode_parts(aggregator_state))
    if plan_source is not None:
        (target / "plan.py").write_text(plan_source)
    # state.json last: a breakpoint is complete once it exists
    (target / "state.json").write_text(json.dumps(state, indent=2))
    return target


def latest_breakpoint(folder: Path) -> Path:
    candidates = sorted(p for p in (folder / "breakpoints").glob("breakpoint_*") if (p / "state.json").exists())
    if not candidates:
        raise ConfigError(f"no complete breakpoint in {folder}", hint="run the experiment with save_breakpoints=True")
    return candidates[-1]


def read_breakpoint(path: Path) -> tuple[dict[str, Any], Params, dict[str, Params], str | None]:
    if not (path / "state.json").exists():
        path = latest_breakpoint(path)
    state = json.loads((path / "state.json").read_text())
    plan = path / "plan.py"
    return (state, load_params(path / "params.safetensors"),
            decode_groups((path / "aggregator.safetensors").read_bytes()), plan.read_text() if plan.exists() else None)


TEXT_COLUMNS = {"pod": "category", "dataset": "category", "device": "category", "error": "category"}  # not a str a row
PLOTTED_ROUNDS = 500  # more is not legible in a panel 4.5 inches wide, and costs memory as the rounds grow
BOUNDED = ("auc", "accuracy", "f1", "precision", "recall")  # scores in [0, 1]: plotted on that whole range


def plot_metrics(folder: Path) -> Path:
    """metrics.png from metrics.csv: read in C, not rebuilt from Python dicts of every round."""
    import pandas as pd

    path = folder / "metrics.png"
    metrics_figure(pd.read_csv(folder / "metrics.csv", dtype=TEXT_COLUMNS)).savefig(path, dpi=110)
    return path


EPSILON = "dp_epsilon"  # what a pod reports under differential privacy (fedpod.algorithms.training.privacy)


def metrics_figure(rows: pd.DataFrame) -> Any:
    """`metrics.png`'s figure: one panel per metric (training loss, validation metrics), one line per pod
    and a thicker one for all pods together — the mean weighted by each pod's rows, which is what
    the global model would score on their union. Rounds from 0, as everywhere; scores in [0, 1] on
    that whole axis and losses from 0, so that a small wobble never looks like a collapse."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    frame = rows[rows["error"].isna()] if "error" in rows else rows
    last = int(frame["round"].max()) if len(frame) else 0
    step = -(-(last + 1) // PLOTTED_ROUNDS)  # a long run is drawn at every step-th round (and its last)
    frame = frame[(frame["round"] % step == 0) | (frame["round"] == last)]
    names = [c for c in frame.columns if c in ("loss", EPSILON) or (c.startswith(("global_", "local_"))
                                                                        and not c.endswith("_samples"))]
    figure = Figure(figsize=(4.5 * max(1, len(names)), 3.4))  # not pyplot's: it keeps state between figures
    axes = figure.subplots(1, max(1, len(names)), squeeze=False)
    for axis, name in zip(axes[0], names, strict=False):
        for pod, rows in frame.groupby("pod"):
            axis.plot(rows["round"], rows[name], marker="o", alpha=0.6, label=str(pod))
        axis.set_title(name)
        axis.set_xlabel("round" if step == 1 else f"round (every {step}th drawn)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if name == EPSILON:  # each pod's own spend: a mean over pods would mean nothing
            axis.set_ylabel("epsilon spent so far (this experiment)")
            axis.set_ylim(bottom=0)
            continue
        weights = frame.get(f"{name.partition('_')[0]}_samples", frame["num_samples"]) if name != "loss" \
            else frame["num_samples"]
        valid = frame[name].notna() & weights.notna()
        weighted = (frame[name][valid] * weights[valid]).groupby(frame["round"][valid]).sum() \
            / weights[valid].groupby(frame["round"][valid]).sum()
        axis.plot(weighted.index, weighted.to_numpy(), color="black", linewidth=2.5, label="all pods (weighted)")
        metric = name.partition("_")[2] if name != "loss" else "loss"
        axis.set_ylabel("training loss" if name == "loss" else f"{metric} ({name.partition('_')[0]} model, "
                        "validation rows)")
        if metric in BOUNDED:
            axis.set_ylim(0, 1.02)
        elif metric in ("loss", "mse", "mae"):
            axis.set_ylim(bottom=0)
    if names:
        axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    return figure


class TensorboardLog:
    """Per-round scalars as TensorBoard event files (`tensorboard --logdir <folder>/tensorboard`)."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError("tensorboard=True needs the tensorboard package",
                              hint="pip install 'fedpod[tensorboard]'") from exc
        self._writer = SummaryWriter(str(folder / "tensorboard"))

    def write(self, round_number: int, replies: dict[str, dict[str, Any]]) -> None:
        for pod, reply in replies.items():
            for name, value in reply.items():
                if isinstance(value, float | int) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{pod}/{name}", value, round_number)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
