"""`tunelab serve`: contract tests with the official openai SDK against a live server.

One module-scoped server over the tiny random Llama with two random LoRA adapters (the base
loaded once); a few small extra servers share its models to test other limits. Greedy
answers are compared with `tunelab generate`'s path (`generate_for_prompts`).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from tunelab.serve import ServerSettings, bind_socket, create_app, load_models
from tunelab.serve.app import StopHoldBack
from tunelab.serve.limits import KeySource, RateLimiter, check_binding, load_keys

KEY = "sk-test-key"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count to five."}]
REPO = Path(__file__).resolve().parents[1]


class LiveServer:
    """uvicorn serving `app` on a free loopback port, in a thread of the test process."""

    def __init__(self, app):
        import uvicorn

        self.sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, key: str = KEY, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def make_adapter(base_dir: Path, out: Path, seed: int, tokenizer) -> Path:
    """A LoRA adapter with random (non-zero) weights saved as a tunelab run's final/ folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunelab.models import write_model_meta

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False)
    final = out / "final"
    get_peft_model(model, config).save_pretrained(final)
    tokenizer.save_pretrained(final)
    write_model_meta(final, base_model=str(base_dir), method="lora", extra={"prompt_format": "chat"})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-runs")
    return {name: make_adapter(tiny_model_dir, root / name, seed, tokenizer) for name, seed in (("alpha", 1), ("beta", 2))}


@pytest.fixture(scope="module")
def served(tiny_model_dir, runs):
    models = load_models(str(tiny_model_dir), [(name, str(path)) for name, path in runs.items()],
                         dtype="fp32", device="cpu", max_batch_size=4)
    yield models
    for m in models:
        m.engine.close()


@pytest.fixture(scope="module")
def server(served):
    # capacity 4 running + 4 queued: the 20-client load test must see 429s.
    live = LiveServer(create_app(served, ServerSettings(keys=(KEY,), max_batch_size=4, max_queue=4, max_tokens=1000)))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def base_id(served) -> str:
    return served[0].id


def expected_greedy(source: str, prompts_messages: list[list[dict]], max_new_tokens: int) -> list[str]:
    """What `tunelab generate SOURCE --temperature 0` answers (the run loaded as the CLI loads it)."""
    from tunelab.generate import GenerationSettings, generate_completions, load_for_generation
    from tunelab.generate import encode_prompt

    model, tokenizer = load_for_generation(source, dtype="fp32", device="cpu")
    encoded = [encode_prompt(tokenizer, m) for m in prompts_messages]
    done = generate_completions(model, tokenizer, encoded, GenerationSettings(max_new_tokens=max_new_tokens), batch_size=1)
    return [c[0].text for c in done]


# ----------------------------------------------------------------------------- models and routing


def test_models_list_base_and_adapters_with_parent(client, base_id, tiny_model_dir):
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == [base_id, "alpha", "beta"]
    assert base_id == tiny_model_dir.name
    assert cards["alpha"].parent == base_id and cards["beta"].parent == base_id
    assert cards[base_id].parent is None
    assert client.models.retrieve("beta").id == "beta"


def test_greedy_chat_equals_tunelab_generate_for_base_and_each_adapter(client, base_id, tiny_model_dir, runs):
    answers = {}
    for name, source in ((base_id, tiny_model_dir), ("alpha", runs["alpha"]), ("beta", runs["beta"])):
        reply = client.chat.completions.create(model=name, messages=MESSAGES, temperature=0, max_tokens=12)
        answers[name] = reply.choices[0].message.content
        assert answers[name].strip() == expected_greedy(str(source), [MESSAGES], 12)[0], name
        assert reply.model == name
        assert reply.choices[0].finish_reason in ("stop", "length")
    assert len(set(answers.values())) == 3, "each adapter answers with its own weights"


def test_chat_usage_counts_prompt_and_completion_tokens(client, base_id, served, tokenizer):
    from tunelab.generate import encode_prompt

    reply = client.chat.completions.create(model=base_id, messages=MESSAGES, temperature=0, max_tokens=9)
    prompt_ids = encode_prompt(tokenizer, MESSAGES)
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == 9 and reply.choices[0].finish_reason == "length"
    assert reply.usage.total_tokens == len(prompt_ids) + 9
    # max_completion_tokens is the same limit under its newer name
    newer = client.chat.completions.create(model=base_id, messages=MESSAGES, temperature=0, max_completion_tokens=5)
    assert newer.usage.completion_tokens == 5


def test_text_completions_single_and_batched_prompts(client, base_id, tokenizer):
    one = client.completions.create(model=base_id, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert one.object == "text_completion" and len(one.choices) == 1
    assert one.usage.prompt_tokens == len(tokenizer("The capital of France is")["input_ids"])
    assert one.usage.completion_tokens == 6 and one.choices[0].finish_reason == "length"
    both = client.completions.create(model=base_id, prompt=["The capital of France is", "1, 2, 3,"], max_tokens=6,
                                     temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == one.choices[0].text  # batched with another prompt: same greedy answer
    assert both.usage.completion_tokens == 12


def test_streamed_chat_equals_non_streamed_with_usage_and_done(server, client, base_id):
    whole = client.chat.completions.create(model="alpha", messages=MESSAGES, temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model="alpha", messages=MESSAGES, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    # the raw stream ends with data: [DONE]
    body = {"model": "alpha", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    raw = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}).text
    events = [line for line in raw.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and "usage" not in json.loads(events[-2][6:])


def test_stop_strings_cut_the_text_and_never_leak_while_streaming(client, base_id):
    free = client.chat.completions.create(model=base_id, messages=MESSAGES, temperature=0, max_tokens=24)
    text = free.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    expected = text[: text.find(stop)]
    for stops in (stop, [stop, "\u2603never"]):
        cut = client.chat.completions.create(model=base_id, messages=MESSAGES, temperature=0, max_tokens=24, stop=stops)
        assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
        stream = client.chat.completions.create(model=base_id, messages=MESSAGES, temperature=0, max_tokens=24,
                                                stop=stops, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(pieces) == expected
        assert not any(stop in "".join(pieces[: i + 1]) for i in range(len(pieces)))
    completion = client.completions.create(model=base_id, prompt="1, 2, 3,", max_tokens=24, temperature=0)
    ctext = completion.choices[0].text
    cstop = ctext[4:6]
    again = client.completions.create(model=base_id, prompt="1, 2, 3,", max_tokens=24, temperature=0, stop=cstop)
    assert again.choices[0].text == ctext[: ctext.find(cstop)] and again.choices[0].finish_reason == "stop"


def test_seed_makes_n_samples_reproducible(client, base_id):
    def sample(seed: int) -> list[str]:
        reply = client.chat.completions.create(model=base_id, messages=MESSAGES, temperature=1.0, max_tokens=8, n=3,
                                               seed=seed)
        assert [c.index for c in reply.choices] == [0, 1, 2] and reply.usage.completion_tokens <= 24
        return [c.message.content for c in reply.choices]

    first = sample(7)
    assert sample(7) == first
    assert len(set(first)) == 3, "n choices are different samples"
    assert sample(8) != first


def test_temperature_zero_is_greedy_not_a_default(client, base_id):
    greedy = [client.chat.completions.create(model=base_id, messages=MESSAGES, temperature=0, max_tokens=10)
              .choices[0].message.content for _ in range(2)]
    assert greedy[0] == greedy[1]
    assert greedy[0].strip() == client.chat.completions.create(
        model=base_id, messages=MESSAGES, temperature=0, max_tokens=10, seed=123).choices[0].message.content.strip()


# ----------------------------------------------------------------------------- errors


def error_of(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("response_format", {"type": "json_object"}),
    ("logit_bias", {"1": 5}),
    ("presence_penalty", 0.5),
    ("frequency_penalty", 1.0),
    ("logprobs", True),
])
def test_unsupported_fields_are_400_naming_the_field(client, base_id, field, value):
    err = error_of(lambda: client.chat.completions.create(model=base_id, messages=MESSAGES, max_tokens=2, **{field: value}))
    assert err.status_code == 400 and isinstance(err, openai.BadRequestError)
    assert err.body["param"] == field and f"'{field}' is not supported" in err.body["message"]


def test_zero_penalties_are_accepted_as_off(client, base_id):
    reply = client.chat.completions.create(model=base_id, messages=MESSAGES, max_tokens=2, presence_penalty=0,
                                           frequency_penalty=0, logprobs=False)
    assert reply.usage.completion_tokens == 2


@pytest.mark.parametrize("body, param, words", [
    ({"messages": MESSAGES}, "model", "'model' is required"),
    ({"model": "M", "messages": []}, "messages", "at least 1"),
    ({"model": "M", "messages": MESSAGES, "temperature": "hot"}, "temperature", "'temperature'"),
    ({"model": "M", "messages": MESSAGES, "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"model": "M", "messages": MESSAGES, "n": "2"}, "n", "'n'"),
    ({"model": "M", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "'messages.0.role'"),
    ({"model": "M", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "'messages.0.role'"),
    ({"model": "M", "messages": MESSAGES, "max_tokens": 5000}, "max_tokens", "above this server's limit of 1000"),
    ({"model": "M", "messages": MESSAGES, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"model": "M", "messages": MESSAGES, "stop": ["a"] * 17}, "stop", "at most 16 stop strings"),
    ({"model": "M", "messages": MESSAGES, "max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens", "disagree"),
    ({"model": "M", "messages": MESSAGES, "n": 9}, "n", "above the 8 generations this server runs or queues"),
])
def test_bad_fields_are_400_with_the_field_named(server, base_id, body, param, words):
    body = {**body, "model": base_id} if body.get("model") == "M" else body
    response = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_malformed_json_unknown_model_and_unknown_route(server, client):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    broken = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "x", "messages": [', headers=headers)
    assert broken.status_code == 400 and "not valid JSON at line 1" in broken.json()["error"]["message"]
    listed = httpx.post(server.url + "/v1/completions", content=b"[1, 2]", headers=headers)
    assert listed.status_code == 400 and "must be a JSON object" in listed.json()["error"]["message"]
    err = error_of(lambda: client.chat.completions.create(model="gpt-4o", messages=MESSAGES))
    assert err.status_code == 404 and err.body["param"] == "model" and "served models: " in err.body["message"]
    missing = httpx.get(server.url + "/v2/nothing", headers=headers)
    assert missing.status_code == 404 and "routes: GET /v1/models" in missing.json()["error"]["message"]


def test_keys_are_required_except_for_health(server, base_id):
    for key in ("wrong-key", KEY + "x"):
        err = error_of(lambda: server.client(key=key).chat.completions.create(model=base_id, messages=MESSAGES))
        assert err.status_code == 401 and isinstance(err, openai.AuthenticationError)
    bare = httpx.get(server.url + "/v1/models")
    assert bare.status_code == 401 and bare.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in bare.json()["error"]["message"]
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_rate_limit_per_key_gives_429_with_retry_after(served, base_id):
    live = LiveServer(create_app(served, ServerSettings(keys=("k1", "k2"), requests_per_minute=3)))
    try:
        for _ in range(3):
            live.client("k1").models.list()
        err = error_of(lambda: live.client("k1").models.list())
        assert err.status_code == 429 and isinstance(err, openai.RateLimitError)
        assert int(err.response.headers["retry-after"]) >= 1 and err.body["code"] == "rate_limit_exceeded"
        assert live.client("k2").models.list().data, "each key has its own budget"
    finally:
        live.stop()


def test_timeout_cancels_the_generation_and_answers_504(served, base_id):
    live = LiveServer(create_app(served, ServerSettings(keys=(KEY,), timeout=0.3, max_tokens=1000)))
    try:
        before = served[0].engine.active
        err = error_of(lambda: live.client().completions.create(model=base_id, prompt="a", max_tokens=900, temperature=0))
        assert err.status_code == 504 and "timeout of 0.3 s" in err.body["message"]
        wait_until(lambda: served[0].engine.active == before and live_in_flight(live) == 0)
    finally:
        live.stop()


# ----------------------------------------------------------------------------- load and disconnects


def live_in_flight(live: LiveServer) -> int:
    return httpx.get(live.url + "/health").json()["in_flight"]


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def record_submissions(model, monkeypatch) -> list:
    """Keep the engine handles the server creates for `model`, to check how they ended."""
    handles = []
    submit = model.engine.submit

    def recording(prompt, params):
        handles.append(submit(prompt, params))
        return handles[-1]

    monkeypatch.setattr(model.engine, "submit", recording)
    return handles


def test_client_disconnect_mid_stream_cancels_and_frees_the_slot(server, served, monkeypatch):
    handles = record_submissions(served[1], monkeypatch)
    body = {"model": "alpha", "messages": MESSAGES, "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk: the request is running
        next(lines)
    wait_until(lambda: handles and handles[0].done)
    result = handles[0].result
    assert result.finish_reason == "cancelled" and result.completion_tokens < 900
    wait_until(lambda: served[1].engine.active == 0 and live_in_flight(server) == 0)


def test_client_disconnect_without_streaming_cancels_too(server, served, monkeypatch):
    handles = record_submissions(served[2], monkeypatch)
    body = {"model": "beta", "messages": MESSAGES, "max_tokens": 900, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    wait_until(lambda: handles and handles[0].done)
    assert handles[0].result.finish_reason == "cancelled" and handles[0].result.completion_tokens < 900
    wait_until(lambda: live_in_flight(server) == 0)


def test_twenty_concurrent_streaming_clients_complete_or_get_429(server, base_id):
    """20 clients at once, mixed lengths, against capacity 8: none lost, the server stays up."""

    def one(i: int) -> tuple[str, float, int]:
        started = time.perf_counter()
        try:
            stream = server.client().chat.completions.create(
                model=(base_id, "alpha", "beta")[i % 3], messages=[{"role": "user", "content": f"Story {i}"}],
                max_tokens=4 + (i * 7) % 40, temperature=0.7, seed=i, stream=True, stream_options={"include_usage": True})
            chunks = list(stream)
        except openai.RateLimitError as err:
            assert err.response.headers["retry-after"] == "1"
            return "429", time.perf_counter() - started, 0
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["stop"], ["length"])
        return "ok", time.perf_counter() - started, chunks[-1].usage.completion_tokens

    started = time.perf_counter()
    with ThreadPoolExecutor(20) as pool:
        outcomes = list(pool.map(one, range(20)))
    elapsed = time.perf_counter() - started
    done = [o for o in outcomes if o[0] == "ok"]
    assert len(outcomes) == 20 and len(done) + sum(o[0] == "429" for o in outcomes) == 20
    assert 1 <= len(done), outcomes
    latencies = sorted(o[1] for o in done)
    tokens = sum(o[2] for o in done)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    print(f"\n20 clients: {len(done)} done, {20 - len(done)} got 429; p50 {statistics.median(latencies):.2f}s "
          f"p95 {p95:.2f}s; {tokens / elapsed:.0f} tok/s")
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "in_flight": 0, "capacity": 8}


# ----------------------------------------------------------------------------- pieces


def test_stop_holdback_sends_everything_but_a_stop_string():
    hold = StopHoldBack(("END", "xy"))
    sent = [hold.feed(piece) for piece in ("ab", "cE", "N", "x", "zE", "ND tail")]
    assert sent == ["ab", "c", "", "EN", "xz", ""]
    assert hold.finish("abcENxz") == ""
    plain = StopHoldBack(())
    assert [plain.feed(p) for p in ("a", "b")] == ["a", "b"] and plain.finish("ab!") == "!"


def test_rate_limiter_refills_over_time():
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert limiter.take("k") is None and limiter.take("k") is None
    assert limiter.take("k") == pytest.approx(30.0)  # 2 a minute: the next token in 30 s
    now[0] = 30.0
    assert limiter.take("k") is None and limiter.take("other") is None
    assert RateLimiter(0).take("k") is None


def test_keys_from_option_env_and_file(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# team keys\nsk-one\n\nsk-two\n")
    assert load_keys(None, keys_file, env={}) == KeySource(("sk-one", "sk-two"), "file")
    assert load_keys("sk-opt", None, env={"TUNELAB_API_KEY": "sk-env"}) == KeySource(("sk-opt",), "option")
    assert load_keys(None, None, env={"TUNELAB_API_KEY": "sk-env"}) == KeySource(("sk-env",), "env")
    with pytest.raises(Exception, match=r"keys.txt:2: an API key must be non-empty and hold no spaces"):
        keys_file.write_text("sk-one\nsk two\n")
        load_keys(None, keys_file, env={})
    with pytest.raises(Exception, match="--host 0.0.0.0 serves other machines and no API key is set"):
        check_binding("0.0.0.0", KeySource((), "none"), insecure=False)
    check_binding("0.0.0.0", KeySource((), "none"), insecure=True)
    check_binding("127.0.0.1", KeySource((), "none"), insecure=False)


def test_cli_refuses_an_open_non_loopback_bind_before_loading(monkeypatch, capsys):
    from tunelab import cli

    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    monkeypatch.setattr(sys, "argv", ["tunelab", "serve", "/no/such/run", "--host", "0.0.0.0"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert "--host 0.0.0.0 serves other machines and no API key is set" in err  # not "no such run": checked first


def test_cli_adapter_option_errors_name_the_option(tiny_model_dir, monkeypatch, capsys):
    from tunelab import cli

    for args, words in ((["--adapter", "nameonly"], "expected NAME=RUN"), (["--adapter", "x=/no/run"], "no run or adapter folder"),
                        (["--adapter", f"x={tiny_model_dir}"], "holds a full model, not a LoRA adapter"),
                        (["--max-batch-size", "0"], "--max-batch-size must be at least 1")):
        monkeypatch.setattr(sys, "argv", ["tunelab", "serve", str(tiny_model_dir), "--port", "0", *args])
        with pytest.raises(SystemExit) as exited:
            cli.main()
        err = capsys.readouterr().err
        assert exited.value.code == 2 and words in err and "Traceback" not in err, err


def test_printed_curl_and_python_snippets_work_as_printed(tiny_model_dir, monkeypatch):
    from tunelab.serve import build_server

    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    server = build_server(str(tiny_model_dir), port=0, max_batch_size=2, dtype="fp32", device="cpu")
    text = server.banner
    assert re.search(r"API key: sk-tunelab-\S+ \(generated for this run", text), text
    assert f"http://127.0.0.1:{server.port}/v1" in text
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.uvicorn.started, seconds=30)
        python = text.split("python (pip install openai):\n")[1].split("\n\n")[0]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(python, {})
        assert printed.getvalue().strip()
        curl = next(line for line in text.splitlines() if line.startswith("curl "))
        if shutil.which("curl"):
            answer = json.loads(subprocess.run(["bash", "-c", curl], text=True, capture_output=True, timeout=60).stdout)
            assert answer["object"] == "chat.completion" and answer["model"] == tiny_model_dir.name
            assert answer["usage"]["completion_tokens"] <= 64
    finally:
        server.stop()
        thread.join(timeout=10)
    from tunelab.engine import SamplingParams
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="engine is closed"):  # stopping the server closed its engine
        server.models[0].engine.submit([1, 2], SamplingParams(max_new_tokens=1))
