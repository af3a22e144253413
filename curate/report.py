"""The run report: one self-contained `report.html` (inline CSS and SVG plots, no scripts, no external
files) built from what a run left on disk: `manifest.json`, each stage's `data.parquet` and
`dropped.parquet`, `quarantine.parquet` and the exported `sft/` and `pref/` folders.

Sections: the funnel (rows after each stage, drops per stage and reason), quarantine reasons, split
counts, length histograms per split (characters, and tokens where a token-count column exists),
near-duplicate cluster sizes, label and language distributions. Sections whose data a run does not
have are left out with a note, so the report works for any pipeline.
"""

from __future__ import annotations

import html
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from curate.atomic import write_text
from curate.runner import load_manifest
from curate.split import KIND_FOLDERS, SPLITS, refresh_dataset_cards

SPLIT_COLORS = {"train": "#3b6ea8", "validation": "#e08a2c", "test": "#4c9a55"}
TOKEN_COLUMN = re.compile(r"^(n_tokens|num_tokens|token_count|tokens|\w+_tokens|\w+_token_count)$")
LABEL_COLUMN = re.compile(r"^(label|labels|\w+_label|label_\w+)$")
LANG_COLUMN = "lang"
_TEXT_COLUMNS = ("messages", "prompt", "chosen", "rejected")


@dataclass
class StageFiles:
    name: str
    type: str
    data: Path | None
    dropped: Path | None
    manifest_entry: dict[str, Any]


def _count(path: Path | None) -> int | None:
    if path is None or not path.exists():
        return None
    return int(pl.scan_parquet(path, glob=False).select(pl.len()).collect().item())


def _columns(path: Path | None) -> list[str]:
    if path is None or not path.exists():
        return []
    return pl.scan_parquet(path, glob=False).collect_schema().names()


def stage_files(run_dir: Path, manifest: dict[str, Any]) -> list[StageFiles]:
    stages = []
    for entry in manifest.get("stages") or []:
        if not isinstance(entry, dict) or not entry.get("name"):
            continue
        folder = run_dir / str(entry["name"])
        data, dropped = folder / "data.parquet", folder / "dropped.parquet"
        stages.append(
            StageFiles(
                name=str(entry["name"]),
                type=str(entry.get("type", "")),
                data=data if data.exists() else None,
                dropped=dropped if dropped.exists() else None,
                manifest_entry=entry,
            )
        )
    return stages


# ---------------------------------------------------------------- plotting


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Same data, same bytes: fixed ids in the SVG, no timestamp, text kept as text (small, crisp).
    plt.rcParams.update({"svg.hashsalt": "curate-report", "svg.fonttype": "none", "font.size": 10})
    return plt


def _svg(fig) -> str:
    plt = _matplotlib()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _barh(labels: list[str], values: list[int], title: str, xlabel: str, color: str = "#3b6ea8") -> str:
    plt = _matplotlib()
    height = max(1.6, 0.32 * len(labels) + 0.9)
    fig, ax = plt.subplots(figsize=(9, height))
    positions = list(range(len(labels)))
    ax.barh(positions, values, color=color)
    ax.set_yticks(positions, labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    top = max(values) if values else 1
    for position, value in zip(positions, values):
        ax.text(value + top * 0.01, position, f"{value:,}", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.15 if top else 1)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def _grouped_bars(categories: list[str], series: dict[str, list[float]], title: str, ylabel: str) -> str:
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(min(9.0, 3.5 + 1.1 * len(categories)), 3.4))
    width = 0.8 / max(1, len(series))
    for index, (name, values) in enumerate(series.items()):
        offsets = [position + (index - (len(series) - 1) / 2) * width for position in range(len(categories))]
        ax.bar(offsets, values, width=width, label=name, color=SPLIT_COLORS.get(name))
    ax.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 6 else 0, ha="right" if len(categories) > 6 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def _plain_ticks(axis) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axis.set_minor_formatter(NullFormatter())


def _histograms(values_by_split: dict[str, list[float]], title: str, xlabel: str) -> str:
    """Step histograms per split on shared bins (log-spaced where lengths span more than 10x), as
    densities, since splits differ in size."""
    import numpy as np

    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(9, 3.2))
    every = np.concatenate([np.asarray(values, dtype=float) for values in values_by_split.values() if len(values)])
    low, high = float(every.min()), float(every.max())
    count = int(min(40, max(8, np.sqrt(len(every)))))
    logarithmic = low >= 1 and high / low > 10
    if logarithmic:
        bins = np.geomspace(low, high * 1.0001, count + 1)
    elif np.all(every == np.round(every)) and high - low <= 2 * count:
        bins = np.arange(low - 0.5, high + 1.5)  # small integer range (token counts): one bin per value
    else:
        bins = np.linspace(low, high, count + 1)
    for split, values in values_by_split.items():
        if not len(values):
            continue
        ax.hist(np.asarray(values, dtype=float), bins=bins, histtype="step", linewidth=1.6, density=True,
                color=SPLIT_COLORS.get(split), label=f"{split} (n={len(values):,}, median {np.median(values):,.0f})")
    if logarithmic:
        ax.set_xscale("log")
        xlabel += " (log scale)"
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _plain_ticks(ax.xaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


def _cluster_size_plot(sizes: pl.DataFrame) -> str:
    plt = _matplotlib()
    fig, ax = plt.subplots(figsize=(9, 3.0))
    counts = sizes["clusters"].to_list()
    ax.bar([str(size) for size in sizes["size"].to_list()], counts, color="#7a5ea8")
    ylabel = "clusters"
    if max(counts) / max(1, min(counts)) > 50:
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.7)
        _plain_ticks(ax.yaxis)
        ylabel += " (log scale)"
    ax.set_xlabel("rows in cluster")
    ax.set_ylabel(ylabel)
    ax.set_title("Near-duplicate cluster sizes")
    ax.spines[["top", "right"]].set_visible(False)
    return _svg(fig)


# ---------------------------------------------------------------- html pieces


def _table(header: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = []
    for row in rows:
        cells = []
        for index, cell in enumerate(row):
            text = f"{cell:,}" if isinstance(cell, int) and not isinstance(cell, bool) else str(cell)
            css = ' class="num"' if index >= numeric_from and isinstance(cell, (int, float)) else ""
            cells.append(f"<td{css}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _figure(svg: str) -> str:
    return f'<div class="figure">{svg}</div>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


CSS = """
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 0;
       background: #f6f7f9; color: #1d2329; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 19px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #d8dde3; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.meta { color: #56606b; font-size: 13px; }
.meta code { background: #e9ecf0; padding: 1px 4px; border-radius: 3px; }
table { border-collapse: collapse; margin: 8px 0 12px; background: #fff; font-size: 13px; }
th, td { border: 1px solid #d8dde3; padding: 4px 10px; text-align: left; }
th { background: #eef1f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figure { background: #fff; border: 1px solid #d8dde3; border-radius: 4px; padding: 8px; margin: 8px 0 14px; }
.figure svg { max-width: 100%; height: auto; display: block; }
.note { color: #56606b; font-style: italic; font-size: 13px; }
.examples pre { white-space: pre-wrap; font-size: 12px; margin: 2px 0; max-height: 12em; overflow: auto; }
.warning { background: #fff4e0; border-left: 4px solid #d98c00; padding: 8px 12px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 12px 0; }
.card { background: #fff; border: 1px solid #d8dde3; border-radius: 4px; padding: 10px 16px; min-width: 130px; }
.card .value { font-size: 22px; font-weight: 600; }
.card .label { color: #56606b; font-size: 12px; }
"""


# ---------------------------------------------------------------- sections


def _first_number(entry: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value)
    return None


def funnel_rows(run_dir: Path, manifest: dict[str, Any], stages: list[StageFiles]) -> tuple[list[dict], pl.DataFrame]:
    """Per stage: rows in, kept, dropped (quarantined for ingest), added (upsampling), counted from the
    Parquet files where present, else taken from the manifest; and drops per (stage, reason)."""
    funnel = []
    reasons = []
    previous_out = None
    for stage in stages:
        entry = stage.manifest_entry
        kept = _count(stage.data)
        if kept is None:
            kept = _first_number(entry, "rows_out")
        if stage.name == "ingest" or stage.type == "ingest":
            dropped = _count(_path_if(run_dir / "quarantine.parquet"))
            if dropped is None:
                dropped = _first_number(entry, "rows_quarantined") or 0
        else:
            dropped = _count(stage.dropped)
            if dropped is None:
                dropped = _first_number(entry, "rows_dropped") or 0
        rows_in = _first_number(entry, "rows_in")
        if rows_in is None:
            rows_in = previous_out
        added = _first_number(entry, "rows_added") or 0
        funnel.append({"stage": stage.name, "type": stage.type, "rows_in": rows_in, "kept": kept, "dropped": dropped, "added": added})
        previous_out = kept
        if stage.dropped is not None and "reason" in _columns(stage.dropped):
            counts = (
                pl.scan_parquet(stage.dropped, glob=False).group_by(pl.col("reason").cast(pl.String).fill_null("(none)")).len().collect()
            )
            if counts.height:
                reasons.append(counts.with_columns(pl.lit(stage.name).alias("stage")))
    by_reason = (
        pl.concat(reasons).select("stage", "reason", pl.col("len").cast(pl.Int64).alias("rows"))
        if reasons
        else pl.DataFrame(schema={"stage": pl.String, "reason": pl.String, "rows": pl.Int64})
    )
    order = {row["stage"]: index for index, row in enumerate(funnel)}
    by_reason = by_reason.with_columns(pl.col("stage").replace_strict(order, default=len(order)).alias("__o")).sort(
        ["__o", "rows", "reason"], descending=[False, True, False]
    ).drop("__o")
    return funnel, by_reason


def _path_if(path: Path) -> Path | None:
    return path if path.exists() else None


def _text_chars() -> pl.Expr:
    parts = [
        pl.col(column).list.eval(pl.element().struct.field("content").str.len_chars()).list.sum().fill_null(0)
        for column in _TEXT_COLUMNS
    ]
    return pl.sum_horizontal(parts).alias("chars")


def final_rows(run_dir: Path, stages: list[StageFiles]) -> tuple[pl.LazyFrame | None, str]:
    """The rows the report describes per split: the split stage's output (it has every score column
    and `split`), else the exported folders, else the last stage's output (no split)."""
    for stage in reversed(stages):
        if stage.data is not None and "split" in _columns(stage.data):
            return pl.scan_parquet(stage.data, glob=False), f"stage {stage.name}"
    frames = []
    for kind, folder in KIND_FOLDERS.items():
        for split in SPLITS:
            for path in sorted((run_dir / folder).glob(f"{split}-*.parquet")):
                frames.append(pl.scan_parquet(path, glob=False).with_columns(pl.lit(kind).alias("kind"), pl.lit(split).alias("split")))
    if frames:
        return pl.concat(frames, how="diagonal_relaxed"), "sft/ and pref/ folders"
    for stage in reversed(stages):
        if stage.data is not None:
            return pl.scan_parquet(stage.data, glob=False).with_columns(pl.lit("all").alias("split")), f"stage {stage.name} (no split)"
    return None, ""


def _split_counts_section(final: pl.LazyFrame | None, run_dir: Path) -> str:
    parts = ["<h2>Splits</h2>"]
    folders = [folder for folder in KIND_FOLDERS.values() if (run_dir / folder).is_dir()]
    if folders:
        parts.append(
            "<p class='meta'>Datasets: "
            + ", ".join(f"<code>{html.escape(str(run_dir / folder))}/</code>" for folder in folders)
            + "</p>"
        )
    if final is None:
        return "".join(parts) + _note("No rows to describe.")
    counts = final.group_by("kind", "split").len().collect()
    splits = [s for s in (*SPLITS, "all") if s in counts["split"].to_list()]
    rows = []
    for kind, folder in KIND_FOLDERS.items():
        values = [int(counts.filter((pl.col("kind") == kind) & (pl.col("split") == s))["len"].sum()) for s in splits]
        rows.append([folder, *values, sum(values)])
    parts.append(_table(["dataset", *splits, "total"], rows))
    return "".join(parts)


def _lengths_section(final: pl.LazyFrame | None) -> str:
    parts = ["<h2>Lengths per split</h2>"]
    if final is None:
        return "".join(parts) + _note("No rows to describe.")
    columns = final.collect_schema().names()
    token_columns = [c for c in columns if TOKEN_COLUMN.match(c)]
    selected = final.select(
        "kind", "split", _text_chars(), *[pl.col(c).cast(pl.Float64) for c in token_columns]
    ).collect()
    for kind, folder in KIND_FOLDERS.items():
        subset = selected.filter(pl.col("kind") == kind)
        if subset.is_empty():
            continue
        splits = [s for s in (*SPLITS, "all") if s in subset["split"].unique().to_list()]
        by_split = {s: subset.filter(pl.col("split") == s)["chars"].to_numpy() for s in splits}
        parts.append(f"<h3>{folder}: characters per row (all turns)</h3>")
        parts.append(_figure(_histograms(by_split, f"{folder}: characters per row", "characters")))
        for column in token_columns:
            by_split = {s: subset.filter(pl.col("split") == s)[column].drop_nulls().to_numpy() for s in splits}
            if any(len(values) for values in by_split.values()):
                parts.append(f"<h3>{folder}: {html.escape(column)}</h3>")
                parts.append(_figure(_histograms(by_split, f"{folder}: {column}", "tokens")))
    if not token_columns:
        parts.append(_note("No token-count column in the data (e.g. n_tokens); token histograms omitted."))
    return "".join(parts)


def _clusters_section(stages: list[StageFiles]) -> str:
    parts = ["<h2>Near-duplicate clusters</h2>"]
    for stage in stages:
        sources = [p for p in (stage.data, stage.dropped) if p is not None and "dup_cluster" in _columns(p)]
        if not sources or stage.data not in sources:
            continue
        # Clusters as the dedup stage saw them: its kept rows plus the duplicates it dropped.
        clusters = pl.concat(
            [pl.scan_parquet(p, glob=False).select(pl.coalesce(pl.col("dup_cluster").cast(pl.String), pl.col("id")).alias("c")) for p in sources]
        )
        sizes = (
            clusters.group_by("c").len().group_by(pl.col("len").alias("size")).agg(pl.len().alias("clusters")).sort("size").collect()
        )
        if sizes.height == 0:  # the dedup stage saw no rows (empty input, or every row quarantined)
            return "".join(parts) + _note(f"Stage {stage.name} received no rows; no clusters to show.")
        multi = sizes.filter(pl.col("size") > 1)
        parts.append(
            f"<p class='meta'>From stage <code>{html.escape(stage.name)}</code> (kept and dropped rows): "
            f"{int(sizes['clusters'].sum()):,} clusters, {int(multi['clusters'].sum()):,} with more than one row, "
            f"largest {int(sizes['size'].max()):,} rows.</p>"
        )
        parts.append(_figure(_cluster_size_plot(sizes)))
        return "".join(parts)
    return "".join(parts) + _note("No dup_cluster column in any stage output; run a dedup stage to see clusters.")


def _distribution_section(stages: list[StageFiles], final: pl.LazyFrame | None) -> str:
    parts = ["<h2>Languages and labels</h2>"]
    found = False
    for stage in stages:
        if stage.data is not None and LANG_COLUMN in _columns(stage.data):
            counts = (
                pl.scan_parquet(stage.data, glob=False).group_by(pl.col(LANG_COLUMN).cast(pl.String).fill_null("(unknown)")).len()
                .sort(["len", LANG_COLUMN], descending=[True, False]).collect()
            )
            top = counts.head(20)
            parts.append(f"<h3>Language after stage {html.escape(stage.name)} (before later filters)</h3>")
            parts.append(_figure(_barh(top[LANG_COLUMN].to_list(), top["len"].to_list(), "Rows per language", "rows", "#2d8c8c")))
            found = True
            break
    if final is not None:
        columns = final.collect_schema().names()
        schema = final.collect_schema()
        wanted = ([LANG_COLUMN] if LANG_COLUMN in columns else []) + categorical_label_columns(final, schema)
        for column in wanted:
            dtype = schema[column]
            if dtype.is_nested():
                values = pl.col(column).cast(pl.List(pl.String)) if isinstance(dtype, pl.List) else None
                if values is None:
                    continue
                frame = final.select("split", values.alias("v")).explode("v")
            else:
                frame = final.select("split", pl.col(column).cast(pl.String).alias("v"))
            counts = frame.with_columns(pl.col("v").fill_null("(none)")).group_by("v", "split").len().collect()
            totals = counts.group_by("v").agg(pl.col("len").sum()).sort(["len", "v"], descending=[True, False]).head(20)
            categories = totals["v"].to_list()
            splits = [s for s in (*SPLITS, "all") if s in counts["split"].to_list()]
            series = {
                s: [int(counts.filter((pl.col("v") == c) & (pl.col("split") == s))["len"].sum()) for c in categories]
                for s in splits
            }
            parts.append(f"<h3>{html.escape(column)} in the final rows, per split</h3>")
            parts.append(_figure(_grouped_bars(categories, series, f"{column} per split", "rows")))
            found = True
    if not found:
        parts.append(_note("No lang or label columns in the data."))
    return "".join(parts)


MAX_LABEL_VALUES = 30


def categorical_label_columns(frame: pl.LazyFrame, schema: pl.Schema) -> list[str]:
    """Label columns worth a bar chart: named like labels, of a categorical kind (strings, booleans,
    small integers, lists of strings) and with few distinct values (not ids, texts or vote counts)."""
    candidates = []
    for column, dtype in schema.items():
        if not LABEL_COLUMN.match(column):
            continue
        if dtype in (pl.String, pl.Boolean, pl.Categorical) or isinstance(dtype, pl.Enum) or dtype.is_integer():
            candidates.append((column, pl.col(column)))
        elif isinstance(dtype, pl.List) and dtype.inner in (pl.String, pl.Categorical):
            candidates.append((column, pl.col(column).explode()))
    if not candidates:
        return []
    distinct = frame.select(expression.n_unique().alias(column) for column, expression in candidates).collect().row(0, named=True)
    return [column for column, _ in candidates if 1 <= distinct[column] <= MAX_LABEL_VALUES]


def _quarantine_section(run_dir: Path) -> str:
    parts = ["<h2>Quarantine</h2>"]
    path = run_dir / "quarantine.parquet"
    if not path.exists():
        return "".join(parts) + _note("No quarantine.parquet in this run.")
    counts = (
        pl.scan_parquet(path, glob=False).group_by(pl.col("reason").fill_null("(none)")).len().sort(["len", "reason"], descending=[True, False]).collect()
        if "reason" in _columns(path)
        else pl.DataFrame({"reason": ["(all)"], "len": [_count(path) or 0]})
    )
    total = int(counts["len"].sum())
    parts.append(f"<p class='meta'>{total:,} raw rows could not be read as records.</p>")
    if total:
        parts.append(_table(["reason", "rows"], [[r, int(n)] for r, n in counts.iter_rows()]))
        parts.append(_figure(_barh(counts["reason"].to_list(), [int(n) for n in counts["len"].to_list()], "Quarantined rows by reason", "rows", "#b5473a")))
    return "".join(parts)


def _funnel_section(funnel: list[dict], by_reason: pl.DataFrame) -> str:
    parts = ["<h2>Funnel</h2>"]
    if not funnel:
        return "".join(parts) + _note("The manifest lists no stages.")
    parts.append(
        _table(
            ["stage", "type", "rows in", "kept", "dropped / quarantined", "added"],
            [
                [r["stage"], r["type"], _or_dash(r["rows_in"]), _or_dash(r["kept"]), _or_dash(r["dropped"]), r["added"]]
                for r in funnel
            ],
            numeric_from=2,
        )
    )
    plotted = [r for r in funnel if r["kept"] is not None]
    parts.append(_figure(_barh([r["stage"] for r in plotted], [int(r["kept"]) for r in plotted], "Rows after each stage", "rows")))
    parts.append("<h3>Dropped rows by stage and reason</h3>")
    if by_reason.is_empty():
        parts.append(_note("No stage dropped rows."))
    else:
        parts.append(_table(["stage", "reason", "rows"], [list(row) for row in by_reason.iter_rows()], numeric_from=2))
        labels = [f"{stage}: {reason}" for stage, reason, _ in by_reason.iter_rows()]
        parts.append(_figure(_barh(labels, by_reason["rows"].to_list(), "Dropped rows by stage and reason", "rows", "#b5473a")))
    return "".join(parts)


EXAMPLES_PER_REASON = 3


def _example_list(texts: list[str]) -> str:
    items = "".join(f"<li><pre>{html.escape(text)}</pre></li>" for text in texts)
    return f"<ul class='examples'>{items}</ul>"


def _examples_section(run_dir: Path, stages: list[StageFiles], by_reason: pl.DataFrame) -> str:
    """A few rows per drop reason and per quarantine reason, as written (escaped), first in file order."""
    from curate.examples import quarantine_examples, row_examples

    parts = ["<h2>Examples per reason</h2>"]
    dropped_paths = {stage.name: stage.dropped for stage in stages if stage.dropped is not None}
    for stage_name, reason, rows in by_reason.select("stage", "reason", "rows").iter_rows():
        path = dropped_paths.get(stage_name)
        if path is None:
            continue
        examples = row_examples(path, EXAMPLES_PER_REASON, reason)
        if examples.is_empty():
            continue
        parts.append(f"<h3>{html.escape(str(stage_name))}: {html.escape(str(reason))} ({int(rows):,} rows)</h3>")
        parts.append(_example_list([f"{src or ''}\n{text}" for src, text in examples.select("source", "text").iter_rows()]))
    quarantine = _path_if(run_dir / "quarantine.parquet")
    if quarantine is not None and "reason" in _columns(quarantine):
        reasons = pl.scan_parquet(quarantine, glob=False).group_by("reason").len().sort(["len", "reason"], descending=[True, False]).collect()
        for reason, rows in reasons.iter_rows():
            examples = quarantine_examples(quarantine, EXAMPLES_PER_REASON, reason)
            parts.append(f"<h3>quarantine: {html.escape(str(reason))} ({int(rows):,} rows)</h3>")
            parts.append(_example_list([
                f"{where} {field or ''}: {detail or ''}\n{raw or ''}" for where, _, field, detail, raw in examples.iter_rows()
            ]))  # fmt: skip
    if len(parts) == 1:
        parts.append(_note("No rows were dropped or quarantined."))
    return "".join(parts)


def _or_dash(value):
    return "–" if value is None else value


def _empty_output_warning(manifest: dict[str, Any]) -> str:
    accounting = manifest.get("accounting") if isinstance(manifest.get("accounting"), dict) else {}
    if accounting.get("kept", 1) or not accounting.get("rows_in"):
        return ""
    from curate.display import biggest_reasons

    reasons = ", ".join(f"{html.escape(name)} ({count:,})" for name, count in biggest_reasons(accounting))
    return f"<p class='warning'><strong>No rows survived.</strong> Biggest reasons: {reasons or 'none recorded'}.</p>"


def build_report(run_dir: str | Path) -> str:
    """The report's HTML for a run directory."""
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    stages = stage_files(run_dir, manifest)
    funnel, by_reason = funnel_rows(run_dir, manifest, stages)
    final, final_from = final_rows(run_dir, stages)

    pipeline = manifest.get("pipeline") if isinstance(manifest.get("pipeline"), dict) else {}
    title = str(pipeline.get("name") or manifest.get("name") or run_dir.name)
    meta = []
    facts = {
        "config hash": pipeline.get("config_hash") or manifest.get("config_hash"),
        "seed": (pipeline.get("config") or {}).get("seed") if isinstance(pipeline.get("config"), dict) else manifest.get("seed"),
        "curate": (manifest.get("versions") or {}).get("curate") if isinstance(manifest.get("versions"), dict) else None,
    }
    for key, value in facts.items():
        if isinstance(value, (str, int, float)):
            meta.append(f"{html.escape(key)}: <code>{html.escape(str(value))}</code>")
    cards = []
    if funnel:
        cards.append((funnel[0]["kept"], f"rows after {funnel[0]['stage']}"))
        cards.append((funnel[-1]["kept"], f"rows after {funnel[-1]['stage']}"))
    total_dropped = int(by_reason["rows"].sum()) if not by_reason.is_empty() else 0
    cards.append((total_dropped, "rows dropped (all stages)"))
    quarantined = _count(_path_if(run_dir / "quarantine.parquet"))
    if quarantined is not None:
        cards.append((quarantined, "raw rows quarantined"))
    cards_html = "".join(
        f"<div class='card'><div class='value'>{'–' if v is None else f'{v:,}'}</div><div class='label'>{html.escape(l)}</div></div>"
        for v, l in cards
    )
    body = [
        f"<h1>Curation report: {html.escape(title)}</h1>",
        _empty_output_warning(manifest),
        f"<p class='meta'>Run directory <code>{html.escape(str(run_dir))}</code>"
        + ("; " + "; ".join(meta) if meta else "")
        + "</p>",
        f"<div class='cards'>{cards_html}</div>",
        _funnel_section(funnel, by_reason),
        _quarantine_section(run_dir),
        _examples_section(run_dir, stages, by_reason),
        _split_counts_section(final, run_dir),
        (f"<p class='meta'>Per-split figures describe the rows of {html.escape(final_from)}.</p>" if final_from else ""),
        _lengths_section(final),
        _clusters_section(stages),
        _distribution_section(stages, final),
    ]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>Curation report: {html.escape(title)}</title><style>{CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Build the report and write it atomically (default `run_dir/report.html`); also rewrites the
    dataset cards in sft/ and pref/ with the finished manifest."""
    run_dir = Path(run_dir)
    target = Path(out) if out is not None else run_dir / "report.html"
    write_text(target, build_report(run_dir))
    # The dataset cards were written before the manifest existed; give them the pipeline section now.
    refresh_dataset_cards(run_dir, load_manifest(run_dir))
    return target
