"""`train eval --tasks`: lm-evaluation-harness tasks over local files on base and adapter, through
`train.cli.main` on a tiny local Llama; the numbers are lm_eval's own (checked against a direct
`simple_evaluate` of the same weights), and bad task files are one line and exit 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from train.cli import main
from train.generate import prompts_and_references

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import one_torch_thread  # noqa: E402,F401  (autouse fixture)
from train_helpers import make_tiny_model, sft_conversations, write_sft_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DISTRACTOR = "Not my problem, go away."


def _task_yaml(path: Path, data: Path, name: str = "memo_mc") -> Path:
    """A multiple-choice task as an lm_eval user writes it: a local JSONL through datasets' json loader."""
    path.write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
        "doc_to_choice": "choices", "doc_to_target": "answer", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An adapter trained on four conversations, and a task asking to pick their replies among distractors."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("lm-tasks")
    model = make_tiny_model(root / "model")
    memo = sft_conversations(4)
    split = write_sft_split(root / "memo", memo, memo)
    common = ["--model", str(model), "--data", str(split), "--output-dir", str(root / "run"), "--max-seq-len", "128"]
    assert main(["sft", *common, "--max-steps", "40", "--lr", "0.01", "--no-progress", "--set", "eval.at_end=false", "--set", "threads=1"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(model)
    pairs = prompts_and_references(memo)
    with (root / "memo.jsonl").open("w") as out:
        for i, (prompt, reply) in enumerate(pairs):
            other = pairs[(i + 1) % len(pairs)][1]
            choices = [DISTRACTOR, other]
            choices.insert(i % 3, reply)
            context = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            out.write(json.dumps({"context": context, "choices": choices, "answer": i % 3}) + "\n")
    (root / "tasks").mkdir()
    task = _task_yaml(root / "tasks" / "memo.yaml", root / "memo.jsonl")
    return {"root": root, "model": model, "adapter": root / "run" / "adapter", "task": task, "common": common}


def _eval_tasks(trained, task, *extra):
    return main(["eval", "--model", str(trained["model"]), "--output-dir", str(trained["root"] / "run"),
                 "--tasks", str(task), "--set", "threads=1", *extra])  # fmt: skip


def _direct_simple_evaluate(model, tokenizer_dir: Path, task: Path) -> dict:
    """lm_eval on its own, with no code of ours in between."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    lm = HFLM(pretrained=model.eval(), tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir), batch_size=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=[str(task)], log_samples=False, bootstrap_iters=0)
    return out["results"]


def test_tasks_table_has_base_and_adapter_and_equals_lm_eval_itself(trained, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out_json = tmp_path / "tasks.json"
    assert _eval_tasks(trained, trained["task"], "--json", str(out_json)) == 0
    printed = capsys.readouterr().out
    assert "memo_mc" in printed and "acc_norm" in printed and "delta" in printed
    result = json.loads(out_json.read_text())
    rows = {row["metric"]: row for row in result["rows"]}
    assert set(rows) == {"acc", "acc_norm"} and all(row["task"] == "memo_mc" for row in rows.values())
    for row in rows.values():
        assert row["delta"] == pytest.approx(row["adapter"] - row["base"])
    # The adapter was trained on these replies; the random base was not.
    assert rows["acc"]["adapter"] == 1.0 and rows["acc"]["base"] < 1.0
    assert result["base"]["n-samples"]["memo_mc"]["effective"] == 4

    base = AutoModelForCausalLM.from_pretrained(trained["model"], dtype=torch.float32)
    direct_base = _direct_simple_evaluate(base, trained["model"], trained["task"])["memo_mc"]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained["model"], dtype=torch.float32), trained["adapter"])
    direct_tuned = _direct_simple_evaluate(tuned, trained["model"], trained["task"])["memo_mc"]
    for metric in ("acc", "acc_norm"):
        assert rows[metric]["base"] == direct_base[f"{metric},none"]
        assert rows[metric]["adapter"] == direct_tuned[f"{metric},none"]


def test_tasks_limit_and_a_folder_of_task_yamls(trained, tmp_path):
    folder = tmp_path / "suite"
    folder.mkdir()
    _task_yaml(folder / "a.yaml", trained["root"] / "memo.jsonl", "memo_a")
    _task_yaml(folder / "b.yaml", trained["root"] / "memo.jsonl", "memo_b")
    (folder / "_base_template.yaml").write_text("output_type: multiple_choice\n")  # no task: a shared include, skipped
    assert _eval_tasks(trained, folder, "--limit", "2", "--json", str(tmp_path / "r.json")) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert {row["task"] for row in result["rows"]} == {"memo_a", "memo_b"}
    assert {task: n["effective"] for task, n in result["base"]["n-samples"].items()} == {"memo_a": 2, "memo_b": 2}
    # A group YAML beside its tasks: its tasks and its aggregate (the folder run above skipped it).
    (folder / "suite.yaml").write_text(yaml.safe_dump({"group": "memo_suite", "task": ["memo_a", "memo_b"],
                                                       "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]}))  # fmt: skip
    assert _eval_tasks(trained, folder / "suite.yaml", "--limit", "2", "--json", str(tmp_path / "g.json")) == 0
    rows = {(row["task"], row["metric"]): row for row in json.loads((tmp_path / "g.json").read_text())["rows"]}
    assert {"memo_a", "memo_b", "memo_suite"} == {task for task, _ in rows}
    for side in ("base", "adapter"):
        assert rows["memo_suite", "acc"][side] == pytest.approx((rows["memo_a", "acc"][side] + rows["memo_b", "acc"][side]) / 2)


def test_chat_template_renders_the_prompts_as_lm_eval_does(trained, tmp_path, monkeypatch):
    """--chat-template: the questions written plainly and rendered by lm_eval through the tokenizer's chat
    template, on both sides; the numbers are lm_eval's own with --apply_chat_template."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    questions = [prompt[-1]["content"] for prompt, _ in prompts_and_references(sft_conversations(4))]
    templated = [json.loads(line) for line in (trained["root"] / "memo.jsonl").read_text().splitlines()]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({**row, "context": question}) + "\n" for row, question in zip(templated, questions)))
    task = _task_yaml(tmp_path / "plain.yaml", plain)
    rendered = []
    original = HFLM.apply_chat_template

    def recording(self, chat_history, *args, **kwargs):
        rendered.append(chat_history)
        return original(self, chat_history, *args, **kwargs)

    monkeypatch.setattr(HFLM, "apply_chat_template", recording)
    assert _eval_tasks(trained, task, "--chat-template", "--json", str(tmp_path / "chat.json")) == 0
    result = json.loads((tmp_path / "chat.json").read_text())
    assert result["chat_template"] is True
    # Every question went through the template as a user turn, for the base and for the adapter.
    users = [turn["content"] for history in rendered for turn in history if turn["role"] == "user"]
    assert sorted(users) == sorted(questions * 2)
    rows = {row["metric"]: row for row in result["rows"]}
    tokenizer = AutoTokenizer.from_pretrained(trained["model"])
    base = AutoModelForCausalLM.from_pretrained(trained["model"], dtype=torch.float32)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained["model"], dtype=torch.float32), trained["adapter"])
    for side, model in (("base", base), ("adapter", tuned)):
        direct = lm_eval.simple_evaluate(model=HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=8), tasks=[str(task)],
                                         log_samples=False, bootstrap_iters=0, apply_chat_template=True)["results"]["memo_mc"]  # fmt: skip
        assert (rows["acc"][side], rows["acc_norm"][side]) == (direct["acc,none"], direct["acc_norm,none"]), side
    rendered.clear()
    assert _eval_tasks(trained, task) == 0 and rendered == []  # without the flag: the questions as written


def _bad_cases(tmp: Path, data: Path) -> dict[str, tuple[Path, str]]:
    good = yaml.safe_load(_task_yaml(tmp / "good.yaml", data).read_text())
    cases = {}
    (tmp / "missing").mkdir()
    cases["missing file"] = (tmp / "missing" / "nope.yaml", "no such task file")
    bad = tmp / "bad"
    bad.mkdir()
    (bad / "t.yaml").write_text("task: [unclosed\n")
    cases["bad yaml"] = (bad / "t.yaml", "not a valid lm_eval task YAML")
    notask = tmp / "notask"
    notask.mkdir()
    (notask / "t.yaml").write_text("dataset_path: json\n")
    cases["no task key"] = (notask / "t.yaml", "needs a `task: NAME`")
    nodata = tmp / "nodata"
    nodata.mkdir()
    (nodata / "t.yaml").write_text(yaml.safe_dump({**good, "dataset_kwargs": {"data_files": {"test": str(tmp / "gone.jsonl")}}}))
    cases["data file missing"] = (nodata / "t.yaml", "gone.jsonl does not exist")
    group = tmp / "group"
    group.mkdir()
    (group / "g.yaml").write_text(yaml.safe_dump({"group": "suite", "task": ["no_such_task"]}))
    cases["unknown task"] = (group / "g.yaml", "unknown task 'no_such_task'")
    hub = tmp / "hub"
    hub.mkdir()
    (hub / "t.yaml").write_text(yaml.safe_dump({k: v for k, v in {**good, "dataset_path": "someorg/not-cached-anywhere"}.items() if k != "dataset_kwargs"}))
    cases["hub dataset, offline"] = (hub / "t.yaml", "OfflineModeIsEnabled")
    return cases


def test_bad_task_files_are_one_line_and_exit_2(trained, tmp_path, capsys, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # As a user who set nothing: the offline switch must come from `train eval --tasks` itself.
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # were anything to go online, it would fail differently
    for case, (task, expected) in _bad_cases(tmp_path, trained["root"] / "memo.jsonl").items():
        capsys.readouterr()
        assert _eval_tasks(trained, task) == 2, case
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:") and expected in err, (case, err)
        assert "Traceback" not in err
    assert "HF_HUB_OFFLINE" not in os.environ and huggingface_hub.constants.HF_HUB_OFFLINE is False  # restored


def test_example_task_in_configs_runs(trained, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # its data_files path is relative to the repository root, as lm_eval reads it
    assert _eval_tasks(trained, "configs/tasks/support_faq.yaml", "--limit", "3") == 0
    assert "support_faq_mc" in capsys.readouterr().out


def test_tasks_flag_combinations_are_refused(trained, capsys):
    assert main(["eval", "--model", str(trained["model"]), "--limit", "2"] + ["--data", "x"]) == 2
    assert "--limit applies to --tasks" in capsys.readouterr().err
    assert _eval_tasks(trained, trained["task"], "--compare", str(trained["adapter"])) == 2
    assert "two different reports" in capsys.readouterr().err
    assert _eval_tasks(trained, trained["task"], "--limit", "0") == 2
    assert "--limit must be a positive" in capsys.readouterr().err
    assert main(["eval", "--model", str(trained["model"]), "--chat-template", "--data", "x"]) == 2
    assert "--chat-template applies to --tasks" in capsys.readouterr().err
