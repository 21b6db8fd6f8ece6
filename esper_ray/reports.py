"""Run outputs: Parquet tables and the report picture."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from esper_ray.contracts import EventKind
from esper_ray.util import atomic_write, read_parquet


def _flat(row: Any) -> dict[str, Any]:
    row = asdict(row) if is_dataclass(row) and not isinstance(row, type) else dict(row)
    # Nested values (dicts, lists) become JSON strings so every table has a flat schema.
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v for k, v in row.items()}


def write_table(rows: Sequence[Any], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Rows (dicts or dataclasses) -> Parquet, written atomically. Empty rows keep ``columns``."""
    path = Path(path)
    flat = [_flat(r) for r in rows]
    if flat:
        keys = list(dict.fromkeys(k for r in flat for k in r))
        table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in flat])
    else:
        table = pa.table({c: pa.array([], pa.string()) for c in (columns or [])})
    return atomic_write(path, lambda f: pq.write_table(table, f))


def read_table(path: str | Path) -> list[dict[str, Any]]:
    return read_parquet(path).to_pylist()


def plot_report(
    history: Sequence[Mapping[str, Any]], events: Sequence[Mapping[str, Any]], path: str | Path, title: str = ""
) -> Path:
    """Accuracy per epoch with germinations, fossilizations and culls marked; params over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_acc, ax_par) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=[2, 1])
    ax_acc.plot(epochs, [r["val_acc"] for r in history], label="validation", color="tab:blue")
    ax_acc.plot(epochs, [r["test_acc"] for r in history], label="test", color="tab:gray", alpha=0.7)
    marks = {
        "germinate": ("tab:green", "^", "germinate"),
        "fossilize": ("tab:purple", "*", "fossilize"),
        "cull": ("tab:red", "x", "cull"),
        "rollback": ("black", "v", "rollback"),
    }
    seen: set[str] = set()
    for ev in events:
        kind = ev.get("kind")
        if kind not in marks:
            continue
        color, marker, label = marks[kind]
        ax_acc.axvline(ev["epoch"], color=color, alpha=0.25, lw=1)
        ax_acc.scatter(
            [ev["epoch"]],
            [ev.get("val_acc", 0.0)],
            color=color,
            marker=marker,
            s=70,
            zorder=3,
            label=None if kind in seen else label,
        )
        slot = ev.get("slot", "")
        if kind == EventKind.GERMINATE:
            ax_acc.annotate(
                f"{ev.get('blueprint', '')}@{slot}",
                (ev["epoch"], ev.get("val_acc", 0.0)),
                textcoords="offset points",
                xytext=(3, -12),
                fontsize=7,
                color=color,
            )
        seen.add(kind)
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend(loc="lower right", fontsize=8)
    ax_acc.grid(alpha=0.3)
    ax_acc.set_title(title)
    ax_par.plot(epochs, [r["total_params"] for r in history], color="tab:orange", label="total")
    ax_par.plot(epochs, [r["host_params"] for r in history], color="tab:blue", ls="--", label="host")
    ax_par.set_ylabel("parameters")
    ax_par.set_xlabel("epoch")
    ax_par.legend(loc="upper left", fontsize=8)
    ax_par.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
