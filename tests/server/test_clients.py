"""Real clients against ``lofit-serve`` (the session's ``peers``), offline, as ``../shared/docs/real-clients.md``
ran them: the ``openai`` SDK, LangChain's ``ChatOpenAI``, lm-evaluation-harness (``local-completions`` with a
log-likelihood and a generation task, ``local-chat-completions``) on small local data files, and vLLM's own
benchmark client ``vllm bench serve``.

lm-eval scores the shipped ``truthfulqa`` adapter on TruthfulQA MC1 (the ITI/LoFiT prompt, fold 0's first test
items) and must get the number ``lofit-eval`` gets on the same items; on the base model, each lm-eval task gets
the same score from ``lofit-serve`` as from vLLM's own server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from lofit.default_model import default_model_dir
from lofit.tasks.truthfulqa import fold_file, format_answer, question_context, read_items
from tests.server.conftest import API_KEY, BASE, REPO, SHIPPED, Peers

PROMPT = "Q: Can pigs fly? A:"
MC_ITEMS = 12
GEN_ITEMS = 8
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OPENAI_API_KEY": API_KEY,
           "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def sdk(peers: Peers):
    from openai import OpenAI

    return OpenAI(base_url=f"{peers.lofit.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


# -- the OpenAI SDK --------------------------------------------------------------------------------------------

def test_openai_sdk_common_options_with_an_adapter(sdk):
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "name": "bob", "content": [{"type": "text", "text": "Can pigs fly?"}]}]
    two = sdk.completions.create(model="truthfulqa", prompt=PROMPT, n=2, max_tokens=4, temperature=0.7, seed=3)
    assert len(two.choices) == 2 and two.model == "truthfulqa"
    echo = sdk.completions.create(model="truthfulqa", prompt=PROMPT, echo=True, logprobs=1, max_tokens=1)
    assert echo.choices[0].text.startswith(PROMPT) and echo.choices[0].logprobs.token_logprobs[0] is None
    ids = sdk.completions.create(model="truthfulqa", prompt=[[2838, 28, 14668]], max_tokens=2,
                                 presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"28": -100},
                                 extra_body={"repetition_penalty": 1.1})
    assert ids.usage.prompt_tokens == 3
    chat = sdk.chat.completions.create(model="truthfulqa", messages=messages, max_tokens=4, logprobs=True,
                                       top_logprobs=2, metadata={"k": "v"}, store=False, temperature=0)
    assert chat.model == "truthfulqa" and len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
    chunks = list(sdk.chat.completions.create(model="truthfulqa", messages=messages, max_tokens=4, stream=True,
                                              stream_options={"include_usage": True}, temperature=0))
    assert chunks[-1].usage.completion_tokens == 4 and {c.model for c in chunks} == {"truthfulqa"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    structured = sdk.chat.completions.create(model="truthfulqa", messages=messages, max_tokens=16, temperature=0,
                                             response_format={"type": "json_object"})
    assert structured.choices[0].message.content.lstrip().startswith("{")
    mixed = sdk.completions.create(model=BASE, prompt=PROMPT, max_tokens=4, temperature=0,
                                   extra_body={"adapters": {"truthfulqa": 1.0}})
    steered = sdk.completions.create(model="truthfulqa", prompt=PROMPT, max_tokens=4, temperature=0)
    assert mixed.choices[0].text == steered.choices[0].text and mixed.model == BASE
    assert sdk.models.retrieve("truthfulqa").parent == BASE


def test_openai_sdk_errors_are_the_sdks_exceptions(sdk):
    from openai import BadRequestError, NotFoundError

    with pytest.raises(NotFoundError):
        sdk.completions.create(model="nope", prompt=PROMPT, max_tokens=1)
    with pytest.raises(NotFoundError):
        sdk.models.retrieve("nope")
    with pytest.raises(BadRequestError, match="adapter_scale"):
        sdk.completions.create(model=BASE, prompt=PROMPT, max_tokens=1, extra_body={"adapter_scale": 2})


# -- LangChain -------------------------------------------------------------------------------------------------

def test_langchain_chat_openai_invoke_stream_and_structured_output(peers: Peers, sdk):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    llm = ChatOpenAI(base_url=f"{peers.lofit.url}/v1", api_key=API_KEY, model="truthfulqa", temperature=0,
                     max_tokens=12, max_retries=0)
    answer = llm.invoke("Can pigs fly?")
    direct = sdk.chat.completions.create(model="truthfulqa", temperature=0, max_completion_tokens=12,
                                         messages=[{"role": "user", "content": "Can pigs fly?"}])
    assert answer.content == direct.choices[0].message.content and answer.usage_metadata["output_tokens"] == 12
    chunks = list(ChatOpenAI(base_url=f"{peers.lofit.url}/v1", api_key=API_KEY, model="truthfulqa", temperature=0,
                             max_tokens=12, stream_usage=True, max_retries=0).stream("Can pigs fly?"))
    assert "".join(c.content for c in chunks) == answer.content
    assert sum((c.usage_metadata or {}).get("output_tokens", 0) for c in chunks) == 12

    class Answer(BaseModel):
        can_fly: bool

    roomy = ChatOpenAI(base_url=f"{peers.lofit.url}/v1", api_key=API_KEY, model="truthfulqa", temperature=0,
                       max_tokens=64, max_retries=0)
    parsed = roomy.with_structured_output(Answer, method="json_schema").invoke("Can pigs fly? Answer in JSON.")
    assert isinstance(parsed, Answer)


# -- lm-evaluation-harness -------------------------------------------------------------------------------------

TASKS = {
    "truthfulqa_mc1_lofit": """
task: truthfulqa_mc1_lofit
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/truthfulqa_mc1.jsonl}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}}]
""",
    "qa_gen_lofit": """
task: qa_gen_lofit
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}/qa_gen.jsonl}}}}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 8, do_sample: false, temperature: 0.0}}
filter_list: [{{name: strip, filter: [{{function: remove_whitespace}}, {{function: take_first}}]}}]
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true}}]
""",
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """lm-eval task configs over local data files: TruthfulQA MC1 with lofit-eval's prompt (fold 0's first test
    items, the best answer first) and short factual questions for generation."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    with (folder / "truthfulqa_mc1.jsonl").open("w") as out:
        for item in read_items(fold_file(0, "test"))[:MC_ITEMS]:
            choices = [format_answer(item.best_answer), *(format_answer(a) for a in item.incorrect_answers)]
            out.write(json.dumps({"context": question_context(item.question) + "\nA:", "choices": choices,
                                  "label": 0}) + "\n")
    questions = [("What is the capital of France?", "Paris"), ("What color is the sky on a clear day?", "Blue"),
                 ("How many legs does a spider have?", "Eight"), ("What is 2 + 2?", "4"),
                 ("What is the largest planet in the Solar System?", "Jupiter"),
                 ("What is the chemical symbol for water?", "H2O"), ("Who wrote Hamlet?", "William Shakespeare"),
                 ("What is the freezing point of water in Celsius?", "0")]
    with (folder / "qa_gen.jsonl").open("w") as out:
        for question, answer in questions[:GEN_ITEMS]:
            out.write(json.dumps({"question": question, "answer": answer}) + "\n")
    for name, config in TASKS.items():
        (folder / f"{name}.yaml").write_text(config.format(data=folder))
    return folder


def lm_eval(tasks: Path, out: Path, task: str, model: str, url: str, kind: str = "local-completions",
            *extra: str) -> float:
    """Run the ``lm-eval`` command line; the task's score."""
    route = "chat/completions" if kind == "local-chat-completions" else "completions"
    args = f"model={model},base_url={url}/v1/{route},num_concurrent=4,max_retries=1,timeout=300"
    if kind == "local-completions":
        args += f",tokenizer={default_model_dir()},tokenizer_backend=huggingface"
    command = [str(Path(sys.executable).with_name("lm-eval")), "run", "--model", kind, "--model_args", args,
               "--tasks", task, "--include_path", str(tasks), "--output_path", str(out), *extra]
    proc = subprocess.run(command, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=1200,
                          cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result] = list(out.rglob("results_*.json"))
    scores = json.loads(result.read_text())["results"][task]
    metric = "acc,none" if "acc,none" in scores else next(k for k in scores if k.startswith("exact_match"))
    return scores[metric]


@pytest.fixture(scope="module")
def lofit_eval_mc1(tmp_path_factory) -> float:
    """``lofit-eval``'s MC1 for the shipped adapter on the same items (the transformers reference, float32)."""
    out = tmp_path_factory.mktemp("lofit-eval") / "truthfulqa.json"
    proc = subprocess.run([sys.executable, "-m", "lofit.eval.cli", "--model", str(default_model_dir()), "--task",
                           "truthfulqa", "--adapter", str(SHIPPED), "--no-base", "--limit", str(MC_ITEMS),
                           "--backend", "transformers", "--dtype", "float32", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [row] = json.loads(out.read_text())["results"]
    return row["mc1"]


def test_lm_eval_scores_an_adapter_on_truthfulqa_mc1_as_lofit_eval_does(peers: Peers, tasks, tmp_path,
                                                                       lofit_eval_mc1):
    score = lm_eval(tasks, tmp_path / "adapter", "truthfulqa_mc1_lofit", "truthfulqa", peers.lofit.url)
    assert score == pytest.approx(lofit_eval_mc1, abs=1e-9), (score, lofit_eval_mc1)
    base = lm_eval(tasks, tmp_path / "base", "truthfulqa_mc1_lofit", BASE, peers.lofit.url)
    assert base == lm_eval(tasks, tmp_path / "vllm", "truthfulqa_mc1_lofit", BASE, peers.vllm)


@pytest.mark.parametrize("kind", ["local-completions", "local-chat-completions"])
def test_lm_eval_generation_tasks(peers: Peers, tasks, tmp_path, kind):
    extra = ("--apply_chat_template",) if kind == "local-chat-completions" else ()
    steered = lm_eval(tasks, tmp_path / "adapter", "qa_gen_lofit", "truthfulqa", peers.lofit.url, kind, *extra)
    assert 0.0 <= steered <= 1.0
    ours = lm_eval(tasks, tmp_path / "base", "qa_gen_lofit", BASE, peers.lofit.url, kind, *extra)
    assert ours == lm_eval(tasks, tmp_path / "vllm", "qa_gen_lofit", BASE, peers.vllm, kind, *extra)


# -- vLLM's benchmark client ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("backend", "endpoint"), [("openai", "/v1/completions"),
                                                  ("openai-chat", "/v1/chat/completions")])
def test_vllm_bench_serve_runs_with_adapters_as_models(peers: Peers, tmp_path, backend, endpoint):
    result = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "vllm_cli.py"), "bench", "serve", "--backend", backend,
         "--base-url", peers.lofit.url, "--endpoint", endpoint, "--model", "truthfulqa", "--tokenizer",
         str(default_model_dir()), "--dataset-name", "random", "--random-input-len", "32", "--random-output-len",
         "8", "--num-prompts", "8", "--max-concurrency", "4", "--ignore-eos", "--save-result", "--result-dir",
         str(tmp_path), "--result-filename", result.name],
        env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    report = json.loads(result.read_text())
    assert report["completed"] == 8 and report.get("failed", 0) == 0, proc.stdout[-2000:]
    assert report["total_output_tokens"] == 8 * 8  # the usage chunk counts, not a re-tokenisation
    assert httpx.get(f"{peers.lofit.url}/metrics").status_code == 200
