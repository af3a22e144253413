"""`train eval --tasks PATH`: lm-evaluation-harness tasks over local files, base vs adapter.

PATH is what `lm_eval --tasks` takes from a user with `--include_path`: an lm_eval task YAML (a `task:` or
`group:` config) or a folder of task YAMLs. Both sides run through `lm_eval.simple_evaluate` on one model
in memory: the base is the adapter disabled (peft's `disable_adapter()`), as everywhere in `train eval`.
The hub is never contacted: the run is offline unless the user set HF_HUB_OFFLINE / HF_DATASETS_OFFLINE.
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
from pathlib import Path

import torch

from train.errors import DataError, TrainError

BATCH_SIZE = 8
BOOTSTRAP_ITERS = 1000  # stderr of non-mean metrics; lm_eval's 100000 costs minutes on a CPU
LOCAL_LOADERS = {"json", "csv", "parquet", "text", "arrow"}  # datasets' builders that read data_files


class TaskFileError(TrainError):
    """A task YAML (or its data file) that lm_eval cannot run."""


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:300]


def _read_task_yaml(path: Path) -> dict:
    """The task config with its `include:` resolved (`!function` tags are read as names, not imported)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        return load_yaml(path, resolve_func=False, recursive=True)
    except FileNotFoundError as error:
        raise TaskFileError(f"{path}: cannot read an included file: {error.filename}") from None
    except Exception as error:  # noqa: BLE001 - any YAML/include problem is the user's file
        raise TaskFileError(f"{path}: not a valid lm_eval task YAML: {_one_line(error)}") from None


def _data_files(cfg: dict) -> list[str]:
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        files = list(files.values())
    if isinstance(files, str):
        files = [files]
    flat = []
    for item in files or []:
        flat += item if isinstance(item, list) else [item]
    return [str(f) for f in flat]


def _check_data_files(path: Path, cfg: dict) -> None:
    """A missing local data file is named here, before a model loads (relative paths are read from the
    working directory, as lm_eval and datasets do)."""
    if cfg.get("dataset_path") not in LOCAL_LOADERS:
        return
    for name in _data_files(cfg):
        if "://" not in name and not glob.glob(os.path.expanduser(name)):
            raise TaskFileError(f"{path}: task {cfg.get('task')!r}: data file {name} does not exist (relative to {Path.cwd()})")


def task_specs(tasks_path: str | Path) -> tuple[Path, list[str], dict[str, dict]]:
    """(folder lm_eval indexes, what to run, its configs) for a task YAML or a folder of them. Tasks are
    handed to lm_eval as files, not names: a sibling YAML reusing a task name never stands in for the one
    asked for."""
    path = Path(tasks_path)
    if not path.exists():
        raise TaskFileError(f"{path}: no such task file or folder")
    if path.is_file() and path.suffix not in (".yaml", ".yml"):
        raise TaskFileError(f"{path}: expected an lm_eval task .yaml file or a folder of them")
    files = sorted(p for p in path.rglob("*.y*ml") if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
    chosen: dict[str, dict] = {}
    for file in files:
        cfg = _read_task_yaml(file)
        name = cfg.get("group") or cfg.get("task")
        if not isinstance(name, str):
            if path.is_dir():
                continue  # a shared base config (used through `include:`), not a task of its own
            raise TaskFileError(f"{file}: not an lm_eval task: needs a `task: NAME` (or `group: NAME`) key")
        if path.is_dir() and "group" in cfg:
            continue  # a folder runs its tasks; a group's aggregate is asked for by its own YAML
        if "group" in cfg:  # by name: lm_eval 0.4.13 cannot load a group by its path
            chosen[name] = {**cfg, "file": str(file)}
        else:
            _check_data_files(file, cfg)
            chosen[str(file.resolve())] = cfg
    if not chosen:
        raise TaskFileError(f"{path}: no lm_eval task YAML (with a `task: NAME` key) in this folder")
    return (path if path.is_dir() else path.parent), list(chosen), chosen


@contextlib.contextmanager
def hub_offline():
    """Offline for the duration of the call unless the user chose: datasets and huggingface_hub read these
    variables at import, so their module flags are switched too (and restored)."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(name) is not None for name in names):
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = (hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    os.environ.update({name: "1" for name in names})
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        for name in names:
            os.environ.pop(name, None)
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm_eval and datasets log every step at INFO/WARNING; the summary table is our output."""
    import datasets

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    progress_was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # tqdm bars of lm_eval's request loops
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if progress_was_on:
            datasets.enable_progress_bars()


def load_tasks(include_path: Path, specs: list[str], configs: dict[str, dict]):
    """Index the tasks' folder and build the tasks once before any model loads, so an unknown task or an
    unreadable dataset is one line."""
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval():
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
    known = set(manager.all_tasks)
    for spec, cfg in configs.items():
        members = cfg.get("task") if "group" in cfg else []
        for member in members if isinstance(members, list) else [members]:
            if isinstance(member, str) and member not in known:
                raise TaskFileError(f"{cfg['file']}: group {cfg['group']!r}: unknown task {member!r} (not defined by a YAML in {include_path})")
    try:
        with hub_offline(), _quiet_lm_eval():
            manager.load(specs)
    except Exception as error:  # noqa: BLE001 - lm_eval raises plain KeyError/ValueError/OSError for user files
        raise TaskFileError(f"{', '.join(specs)}: lm_eval cannot load the task: {_one_line(error)}") from None
    return manager


def evaluate_model(lm, specs: list[str], manager, limit: int | None, chat_template: bool = False) -> dict:
    """lm_eval's own evaluation of one model: its `results` (per task and group) and `n-samples`.
    `chat_template`: lm_eval renders each prompt as a user turn through the tokenizer's chat template."""
    import lm_eval

    with hub_offline(), _quiet_lm_eval():
        out = lm_eval.simple_evaluate(
            model=lm, tasks=specs, task_manager=manager, limit=limit, log_samples=False, bootstrap_iters=BOOTSTRAP_ITERS,
            apply_chat_template=chat_template,
        )
    return {key: out.get(key, {}) for key in ("results", "groups", "n-samples", "higher_is_better", "versions")}


def comparison_rows(base: dict, adapter: dict) -> list[dict]:
    """One row per (task, metric): base, adapter and delta = adapter - base (stderr columns left out)."""
    rows = []
    for task in sorted(base["results"]):
        for key, value in base["results"][task].items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filter_name = key.split(",", 1)
            other = adapter["results"].get(task, {}).get(key)
            rows.append({
                "task": task, "metric": metric if filter_name == "none" else f"{metric} ({filter_name})",
                "base": float(value), "adapter": None if other is None else float(other),
                "delta": None if other is None else float(other) - float(value),
                "higher_is_better": base.get("higher_is_better", {}).get(task, {}).get(metric),
            })  # fmt: skip
    return rows


def run_lm_eval_tasks(config, adapter_dir: str | Path, tasks_path: str | Path, limit: int | None = None, chat_template: bool = False) -> dict:
    """`train eval --tasks PATH`: the tasks on the base model and on the adapter; rows and both raw results.
    `chat_template` (`--chat-template`): prompts go through the tokenizer's chat template (the config's
    `data.chat_template` when set), on both sides."""
    from train.data import set_chat_template
    from train.models import load_adapter, load_base_model, load_tokenizer, set_cpu_threads

    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TrainError("train eval --tasks needs lm-evaluation-harness: pip install 'curate-train[eval]'") from None
    from lm_eval.models.huggingface import HFLM

    if limit is not None and limit < 1:
        raise TrainError(f"--limit must be a positive number of examples per task, got {limit}")
    include_path, specs, configs = task_specs(tasks_path)
    manager = load_tasks(include_path, specs, configs)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        set_cpu_threads(config.threads)
    tokenizer = load_tokenizer(config.model)
    set_chat_template(tokenizer, config.data.chat_template)
    model = load_adapter(load_base_model(config.model).to(device), adapter_dir).to(device).eval()
    with _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH_SIZE)
    try:
        with model.disable_adapter():
            base = evaluate_model(lm, specs, manager, limit, chat_template)
        tuned = evaluate_model(lm, specs, manager, limit, chat_template)
    except (KeyError, IndexError, TypeError, ValueError, OSError) as error:  # a task config that fits no document
        raise TaskFileError(f"{tasks_path}: lm_eval failed: {_one_line(error)}") from None
    if not base["results"]:
        raise DataError(f"{tasks_path}: lm_eval returned no results (empty data files?)")
    return {
        "tasks": str(tasks_path), "tasks_run": specs, "limit": limit, "chat_template": chat_template, "adapter": str(adapter_dir),
        "rows": comparison_rows(base, tuned), "base": base, "adapter_results": tuned,
    }  # fmt: skip
