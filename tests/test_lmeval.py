"""The lm-evaluation-harness bridge, offline, on a local task (lm-eval's real Python API when installed)."""

import importlib.util
import json

import pytest
import torch

import flexquant as fq
from flexquant.cli import main

HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
DOCS = [  # equal-length choices, so the answer depends on the model, not on the number of tokens
    {"question": "def add(a, b): return", "choices": ["a + b", "a ~ q", "zzzzz"], "answer": 0},
    {"question": "for i in", "choices": ["range", "xqzjw", "()()("], "answer": 0},
    {"question": "import", "choices": [" os", "qqq", "..."], "answer": 0},
    {"question": "x = [1, 2,", "choices": [" 3]", "#@!", "abc"], "answer": 0},
    {"question": "while True:", "choices": ["\n    ", "zzzzz", "11111"], "answer": 1},
    {"question": "print(", "choices": ["'hi')", "]]]]]", "hello"], "answer": 2},
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "docs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    (d / "fq_local.yaml").write_text(
        "task: fq_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    return d


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    qm = fq.quantize("tiny-llama", method="rtn", bits=4, group_size=32, progress=False)
    return qm, fq.save(qm, tmp_path_factory.mktemp("lm") / "q", plot=False)


def _expected_acc(model, tok) -> float:
    """Accuracy from the model's own log-likelihoods of each choice after its question."""
    right = 0
    for d in DOCS:
        scores = []
        for choice in d["choices"]:
            ctx = tok(d["question"]).input_ids
            whole = tok(d["question"] + choice).input_ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            cont = range(len(ctx), len(whole))
            scores.append(sum(float(logp[i - 1, whole[i]]) for i in cont))
        right += int(max(range(len(scores)), key=scores.__getitem__) == d["answer"])
    return right / len(DOCS)


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed (pip install 'flexquant[lmeval]')")
def test_local_task_through_lm_eval_matches_own_loglikelihoods(ckpt, task_dir, tmp_path, capsys):
    qm, path = ckpt
    out = tmp_path / "res.json"
    assert main(["eval", str(path), "--tasks", "fq_local_mc", "--include-path", str(task_dir), "--json", "-q",
                 "--output", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["results"]["fq_local_mc"]["acc,none"] == pytest.approx(_expected_acc(qm.model, qm.tokenizer))
    assert res["n_samples"]["fq_local_mc"]["effective"] == len(DOCS)
    assert res["bpw"] == pytest.approx(qm.bpw) and json.loads(out.read_text()) == res


def test_missing_lm_eval_and_unknown_tasks_give_clear_errors(ckpt, task_dir, monkeypatch, capsys):
    _, path = ckpt
    if HAS_LM_EVAL:
        assert main(["eval", str(path), "--tasks", "no_such_task_xyz", "-q"]) == 2
        err = capsys.readouterr().err
        assert "unknown lm-eval task(s) no_such_task_xyz" in err and "Traceback" not in err
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *a, **k):
        if name.startswith("lm_eval"):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert main(["eval", str(path), "--tasks", "hellaswag", "-q"]) == 2
    err = capsys.readouterr().err
    assert "needs lm-evaluation-harness" in err and "flexquant[lmeval]" in err


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed")
def test_hub_task_offline_says_what_is_missing(ckpt, monkeypatch):
    """A task whose dataset lives on the hub fails at once, naming the task, when the hub cannot be reached."""
    from flexquant.errors import FlexQuantError
    from flexquant.eval import lmeval
    from flexquant.models import loader

    monkeypatch.setattr(loader, "_hub_reachable", lambda timeout=3.0: False)
    qm, _ = ckpt
    with pytest.raises(FlexQuantError, match="lm-eval task 'arc_easy'.*cannot be reached"):
        lmeval.run_tasks(qm.model, qm.tokenizer, ["arc_easy"])
