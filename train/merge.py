"""`train merge`: fold the LoRA adapter into the base weights and write a plain safetensors model folder
(plus the tokenizer) that `AutoModelForCausalLM.from_pretrained` loads with no peft installed; or, with
several adapters, combine them into one new adapter (peft's `add_weighted_adapter`: linear, TIES, DARE).

The output folder is ours or new: an existing `--out` is replaced only when a previous `train merge`
wrote it (its ownership marker lists everything inside); anything else is refused before the merge."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch

from safety.locking import exclusive_lock
from safety.ownership import check_replaceable, claim_dir, mark_new_dir, remove_marked_temp_dirs, replace_dir
from train.config import ModelConfig
from train.errors import ModelLoadError, TrainConfigError
from train.models import load_adapter, load_base_model, load_tokenizer

KIND = "merged-model"
ADAPTER_KIND = "merged-adapter"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
METHODS = ("linear", "ties", "dare_ties", "dare_linear")


@contextmanager
def _owned_output(out_dir: Path, kind: str, protected: list) -> Iterator[Path]:
    """A temp folder beside `out_dir`, swapped in as `out_dir` when the block finishes."""
    out_dir = claim_dir(out_dir, "train", kind, protected, option="--out")
    with exclusive_lock(out_dir, "train merge"):
        # Temp folders of a killed merge sit beside --out (the rename must stay on one file system);
        # only those carrying our marker are ours to remove.
        remove_marked_temp_dirs(out_dir.parent, f".{out_dir.name}.", "train")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        try:
            mark_new_dir(tmp, "train", kind)
            yield tmp
            replace_dir(tmp, out_dir, "train")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def merge_adapter(
    model_config: ModelConfig,
    adapter_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    protected: Iterable[str | Path] = (),
) -> Path:
    """Base + adapter folded together in fp32, saved in `dtype` (fp16/bf16 halve the folder)."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not adapter_dir.is_dir():
        raise ModelLoadError(f"{adapter_dir}: adapter folder not found")
    protected = [adapter_dir, *protected]
    check_replaceable(out_dir, "train", protected, option="--out")  # before minutes of merging
    # Load first: a base or adapter that cannot be loaded fails before any output folder exists.
    base = load_base_model(model_config, dtype=torch.float32)
    merged = load_adapter(base, adapter_dir).merge_and_unload().to(dtype)
    merged.config.use_cache = True
    tokenizer = _tokenizer_of(adapter_dir, model_config)
    with _owned_output(out_dir, KIND, protected) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir


def combine_adapters(
    model_config: ModelConfig,
    adapter_dirs: list[str | Path],
    out_dir: str | Path,
    method: str,
    weights: list[float] | None = None,
    density: float | None = None,
    seed: int = 0,
    protected: Iterable[str | Path] = (),
) -> Path:
    """One new adapter from several trained on the same base, written as an adapter folder (evaluate it
    with `train eval --adapter OUT`, fold it in with `train merge --adapter OUT`). TIES/DARE prune to
    `density`; DARE's random drop is seeded with `seed`."""
    adapter_dirs, out_dir = [Path(a) for a in adapter_dirs], Path(out_dir)
    weights = [1.0] * len(adapter_dirs) if weights is None else list(weights)
    _check_combination(adapter_dirs, method, weights, density)
    protected = [*adapter_dirs, *protected]
    check_replaceable(out_dir, "train", protected, option="--out")
    model = load_adapter(load_base_model(model_config, dtype=torch.float32), adapter_dirs[0], adapter_name="a0")
    for i, adapter in enumerate(adapter_dirs[1:], start=1):
        load_adapter(model, adapter, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    torch.manual_seed(seed)
    try:
        model.add_weighted_adapter(names, weights, "combined", combination_type=method, density=density)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ModelLoadError(f"cannot combine {', '.join(map(str, adapter_dirs))} with {method}: {' '.join(str(error).split())[:300]}") from None
    tokenizer = _tokenizer_of(adapter_dirs[0], model_config)
    with _owned_output(out_dir, ADAPTER_KIND, protected) as tmp:
        model.save_pretrained(tmp / "peft", selected_adapters=["combined"])
        for file in (tmp / "peft" / "combined").iterdir():  # peft saves a named adapter in a subfolder
            file.replace(tmp / file.name)
        shutil.rmtree(tmp / "peft")
        tokenizer.save_pretrained(tmp)
        modes = {(a / "train_mode.txt").read_text().strip() for a in adapter_dirs if (a / "train_mode.txt").is_file()}
        if len(modes) == 1:
            (tmp / "train_mode.txt").write_text(modes.pop() + "\n")
    return out_dir


def _tokenizer_of(adapter_dir: Path, model_config: ModelConfig):
    """The tokenizer saved with the adapter (it carries the chat template trained with), else the base's."""
    if not (adapter_dir / "tokenizer_config.json").is_file():
        return load_tokenizer(model_config)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=False)
    except Exception as error:  # noqa: BLE001 - a damaged tokenizer file is a user-facing model problem
        raise ModelLoadError(f"{adapter_dir}: cannot load the adapter's tokenizer: {' '.join(str(error).split())[:300]}") from None


def _check_combination(adapter_dirs: list[Path], method: str, weights: list[float], density: float | None) -> None:
    if len(adapter_dirs) < 2:
        raise TrainConfigError("--adapters: give two or more adapter folders to combine")
    if method not in METHODS:
        raise TrainConfigError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    if len(weights) != len(adapter_dirs):
        raise TrainConfigError(f"--weights: {len(weights)} weight(s) for {len(adapter_dirs)} adapters")
    if any(w != w or abs(w) == float("inf") for w in weights):
        raise TrainConfigError("--weights: every weight must be a finite number")
    if method == "linear" and density is not None:
        raise TrainConfigError("--density applies to ties, dare_ties and dare_linear, not linear")
    if method != "linear" and (density is None or not 0 < density <= 1):
        raise TrainConfigError(f"--density: {method} needs a density in (0, 1] (the share of each adapter's weights kept)")
    for adapter in adapter_dirs:
        if not adapter.is_dir():
            raise ModelLoadError(f"{adapter}: adapter folder not found")
