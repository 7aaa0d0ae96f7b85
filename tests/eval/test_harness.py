"""The lm-eval adapter: a local multiple-choice task end to end, offline; its
log-likelihoods equal the model's own, computed here from its logits."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from fbi.trained import load
from fbi_testing import wikitext_lines

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def write_task(directory, n_docs: int = 6):
    # Short: context and continuation fit the tiny model's 32-token context untruncated.
    sentences = [s for s in wikitext_lines(40_000, "test") if len(s.split()) > 12][:n_docs + 1]
    docs = []
    for i in range(n_docs):
        words, other = sentences[i].split(), sentences[i + 1].split()
        docs.append({"question": " ".join(words[:5]),
                     "choices": [" ".join(words[5:8]), " ".join(other[5:8])], "answer": 0})
    data = directory / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs))
    (directory / "fbi_local.yaml").write_text(
        "task: fbi_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ' '\n"
        "metric_list:\n  - metric: acc\n"
    )
    return docs


def own_logprob(trained, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), lm-eval's split of the joint tokenization."""
    tok = trained.tokenizer
    ctx = tok.encode([context])[0]
    whole = tok.encode([context + continuation])[0]
    assert len(whole) <= trained.max_length
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(trained.logits(ids)[0].double(), -1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


def test_local_task_runs_offline_with_the_models_own_loglikelihoods(tmp_path, zero3_run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import fbi.eval.harness  # noqa: F401  (registers --model fbi, as python -m fbi lm-eval does)
    from fbi.cli import main

    docs = write_task(tmp_path)
    out = lm_eval.simple_evaluate(
        model="fbi", model_args=f"path={zero3_run},batch_size=4", tasks=["fbi_local"],
        task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
    )
    trained = load(zero3_run)
    samples = out["samples"]["fbi_local"]
    assert len(samples) == len(docs)
    right = 0
    for sample in samples:
        doc = sample["doc"]
        lls = [resp[0][0] for resp in sample["resps"]]
        ours = [own_logprob(trained, doc["question"], " " + c) for c in doc["choices"]]
        assert lls == pytest.approx(ours, rel=1e-5)
        right += ours[0] > ours[1]
    assert out["results"]["fbi_local"]["acc,none"] == pytest.approx(right / len(docs))

    # loglikelihood_rolling: a whole text after the document-start token
    from fbi.eval.harness import FbiLM

    lm = FbiLM(path=str(zero3_run))
    text = "The history of the city"
    ids = [trained.start_id] + trained.tokenizer.encode([text])[0]
    [rolling] = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    with torch.no_grad():
        logprobs = torch.log_softmax(trained.logits(torch.tensor([ids]))[0].double(), -1)
    assert rolling == pytest.approx(sum(logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))))

    # the command line: lm-eval's own, with --model fbi registered
    main(["lm-eval", "--model", "fbi", "--model_args", f"path={zero3_run}", "--tasks", "fbi_local",
          "--include_path", str(tmp_path), "--output_path", str(tmp_path / "results")])
    written = list((tmp_path / "results").rglob("results*.json"))
    assert len(written) == 1
    acc = json.loads(written[0].read_text())["results"]["fbi_local"]["acc,none"]
    assert acc == out["results"]["fbi_local"]["acc,none"]


def write_generation_task(directory, n_docs: int = 3):
    data = directory / "gen.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "answer": "x"}) for q in
                              ["The history of", "In the city of", "He was"][:n_docs]))
    (directory / "fbi_gen.yaml").write_text(
        "task: fbi_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: [',', '.']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )


@pytest.mark.parametrize("settings", [["--model_args", "path={model},batch_size=8,device=cpu"],
                                      ["--model_args", "path={model}", "--batch_size", "4",
                                       "--device", "cpu"]])
def test_the_readmes_command_line_runs(tmp_path, tokenizer_dir, settings):
    """lm-eval passes --batch_size and --device beside --model_args (defaults 1 and cuda:0
    even when not given); both ways run, offline, a log-likelihood and a generation task."""
    import os
    import subprocess
    import sys

    from fbi.export.packed import export_packed
    from fbi.generate import cached_model, generate_ids
    from fbi_testing import REPO

    sys.path.insert(0, str(REPO / "tests" / "export"))
    from test_packed import tiny_trained

    trained = tiny_trained("fbi", tokenizer_dir)
    export_packed(trained, tmp_path / "model")
    write_task(tmp_path, n_docs=2)
    write_generation_task(tmp_path)
    argv = [a.format(model=tmp_path / "model") for a in settings]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "fbi", "lm-eval", "--model", "fbi", *argv,
                    "--tasks", "fbi_local,fbi_gen", "--include_path", str(tmp_path),
                    "--output_path", str(tmp_path / "results"), "--log_samples"],
                   env=env, check=True, timeout=600, capture_output=True, text=True)
    results = json.loads(next((tmp_path / "results").rglob("results*.json")).read_text())
    assert {"fbi_local", "fbi_gen"} <= set(results["results"])
    rows = [json.loads(line) for line in
            next((tmp_path / "results").rglob("samples_fbi_gen*.jsonl")).read_text().splitlines()]
    packed = load(tmp_path / "model")  # its full-precision parts in bf16
    model = cached_model(packed)
    for row in rows:  # stopped at the first ',' or '.', which is cut off
        prompt = [packed.start_id] + packed.tokenizer.encode([row["doc"]["question"]])[0]
        ours = packed.tokenizer.decode(
            [t for t in generate_ids(packed, prompt, 12, stop=[",", "."], model=model)
             if t != packed.tokenizer.eos_id])
        assert row["resps"][0][0] == ours.split(",")[0].split(".")[0]
