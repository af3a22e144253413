"""A tiny random Llama model + a BPE tokenizer trained here with `tokenizers`, saved as a local Hugging
Face folder with a chat template (no download), and split directories in the layout `curate split`
writes (train-*.parquet / validation-*.parquet with canonical columns)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TEXTS = REPO / "sample_data" / "raw" / "support_alpaca.jsonl"

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOPICS = ["password reset", "refund", "shipping delay", "invoice copy", "account locked", "two-factor setup", "billing", "login"]


def corpus_texts(limit: int = 400) -> list[str]:
    """Support-domain text for the tokenizer: sample_data when present, plus the generated conversations."""
    texts = []
    if SAMPLE_TEXTS.is_file():
        for line in SAMPLE_TEXTS.read_text(encoding="utf-8", errors="replace").splitlines()[:limit]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            texts += [v for v in row.values() if isinstance(v, str)]
    for conv in sft_conversations(64):
        texts += [m["content"] for m in conv]
    return texts


def sft_conversations(count: int, offset: int = 0) -> list[list[dict]]:
    out = []
    for i in range(offset, offset + count):
        topic = TOPICS[i % len(TOPICS)]
        convo = [
            {"role": "system", "content": "You are a support agent."},
            {"role": "user", "content": f"Hi, I need help with {topic} for order {1000 + i}."},
            {"role": "assistant", "content": f"Sure. For {topic} on order {1000 + i}, open Settings then {topic.split()[0]}."},
        ]
        if i % 3 == 0:
            convo += [
                {"role": "user", "content": "Thanks, anything else?"},
                {"role": "assistant", "content": f"No, {topic} is done. Ticket {i}."},
            ]
        out.append(convo)
    return out


def pref_pairs(count: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(offset, offset + count):
        topic = TOPICS[i % len(TOPICS)]
        out.append(
            {
                "prompt": [{"role": "user", "content": f"My {topic} is not working, order {2000 + i}."}],
                "chosen": [{"role": "assistant", "content": f"Sorry about the {topic}. Open Settings and retry order {2000 + i}."}],
                "rejected": [{"role": "assistant", "content": "Not my problem, go away."}],
            }
        )
    return out


def make_tokenizer(folder: Path, vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def make_tiny_model(folder: str | Path, seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 64) with its tokenizer, saved as a safetensors HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.15,  # logits wide enough for a LoRA on the body to fit a small set
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _messages(rows):
    return pl.Series(rows, dtype=pl.List(pl.Struct({"role": pl.String, "content": pl.String})))


def write_sft_split(folder: str | Path, train: list[list[dict]], validation: list[list[dict]]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", validation)):
        frame = pl.DataFrame({"id": [f"{name}{i:04d}" for i in range(len(rows))], "kind": ["sft"] * len(rows)})
        frame = frame.with_columns(messages=_messages(rows))
        frame.write_parquet(folder / f"{name}-00000.parquet")
    return folder


def write_pref_split(folder: str | Path, train: list[dict], validation: list[dict]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("validation", validation)):
        frame = pl.DataFrame({"id": [f"{name}{i:04d}" for i in range(len(rows))], "kind": ["preference"] * len(rows)})
        frame = frame.with_columns(
            prompt=_messages([r["prompt"] for r in rows]),
            chosen=_messages([r["chosen"] for r in rows]),
            rejected=_messages([r["rejected"] for r in rows]),
        )
        frame.write_parquet(folder / f"{name}-00000.parquet")
    return folder


def base_config(model_dir: Path, split_dir: Path, output_dir: Path, **optim) -> dict:
    return {
        "model": {"path": str(model_dir)},
        "data": {"split_dir": str(split_dir), "max_seq_len": 128},
        "output_dir": str(output_dir),
        "seed": 0,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "optim": {"lr": 1e-2, "max_steps": 6, "batch_rows": 2, "grad_accum": 2, "warmup_steps": 1, **optim},
        "eval": {"every": 0, "samples": 1, "max_new_tokens": 8},
        "progress": False,
        "threads": 1,
    }


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Autouse in the training test modules that import it: two cores shared with other work, and one
    intra-op thread is ~10x faster than two oversubscribed ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
