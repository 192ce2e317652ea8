"""``edge-llm serve`` as clients use it: real servers on loopback ports (subprocesses), the official openai
client and plain HTTP, the embedded SmolLM2.

Server A batches up to 8 requests; server B decodes one at a time (so its answers are the unbatched
reference), queues one more, requires an API key and is stopped with Ctrl-C; A is stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPResponse

import openai
import pytest

SERVE = [sys.executable, "-m", "cli.main", "serve"]
ENV = {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}
ENV.pop("EDGE_LLM_API_KEY", None)
KEY = "test-key-123"
MODEL = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reply:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body)


def request(server: Server, method: str, path: str, body: bytes | dict | None = None,
         headers: dict | None = None) -> Reply:
    """Plain HTTP, no client library in between."""
    conn = HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return Reply(response.status, response.read())
    finally:
        conn.close()


@dataclass
class Server:
    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict:
        return request(self, "GET", "/health").json()

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def stop(self, sig: int) -> tuple[int, str]:
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(30)
        finally:
            self.proc.kill()
        return code, self.proc.stderr.read().decode()


def start(*args: str, env: dict | None = None) -> Server:
    port = free_port()
    proc = subprocess.Popen([*SERVE, "--port", str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env or ENV)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited {proc.returncode}: {proc.stderr.read().decode()}")
        try:
            server = Server(proc, port)
            if request(server, "GET", "/health").status == 200:
                return server
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("server did not answer /health within 90 s")


@pytest.fixture(scope="module")
def server_a() -> Iterator[Server]:
    server = start("--max-batch", "8")
    yield server
    code, stderr = server.stop(signal.SIGTERM)
    assert code == 0 and "Traceback" not in stderr, stderr


@pytest.fixture(scope="module")
def server_b() -> Iterator[Server]:
    server = start("--max-batch", "1", "--max-queue", "1", env={**ENV, "EDGE_LLM_API_KEY": KEY})
    yield server
    code, stderr = server.stop(signal.SIGINT)
    assert code == 0 and "Traceback" not in stderr, stderr
    assert stderr.strip().endswith("stopped"), stderr


def chat(client: openai.OpenAI, text: str, max_tokens: int, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                          temperature=0, max_tokens=max_tokens, **kw)


PROMPT = "What is the capital of France? Answer in two sentences."


@pytest.mark.slow
def test_greedy_chat_equals_run_and_streams_the_same_text(server_a):
    run = subprocess.run([sys.executable, "-m", "cli.main", "run", "--temp", "0", "-n", "40", "--json", "-p", PROMPT],
                         capture_output=True, timeout=120, env=ENV, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr.decode()
    expected = json.loads(run.stdout)
    client = server_a.client()
    answer = chat(client, PROMPT, 40)
    assert answer.choices[0].message.content == expected["text"]
    assert answer.choices[0].finish_reason == expected["finish_reason"]
    assert answer.usage.prompt_tokens == expected["prompt_tokens"]
    assert answer.usage.completion_tokens == expected["generation_tokens"]
    assert answer.usage.total_tokens == expected["prompt_tokens"] + expected["generation_tokens"]

    chunks = list(chat(client, PROMPT, 40, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == expected["generation_tokens"]
    # the same prompt again: its cache was kept, only the last token is computed anew
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == expected["prompt_tokens"] - 1


QUESTIONS = [f"Name {n} animals that live in the {place}." for n, place in
             [(2, "sea"), (3, "desert"), (4, "forest"), (2, "arctic"), (3, "jungle"), (5, "farm"), (2, "sky"),
              (3, "river")]]


@pytest.mark.slow
def test_eight_concurrent_requests_are_batched_and_answer_as_alone(server_a, server_b):
    client, results = server_a.client(), {}

    def ask(question: str) -> None:
        results[question] = chat(client, question, 12).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 8 and all(results.values())
    assert server_a.health()["largest_batch"] >= 4  # they were decoded together, not one after another
    alone = server_b.client(KEY)  # B decodes one request at a time
    for question in QUESTIONS:
        assert chat(alone, question, 12).choices[0].message.content == results[question], question


def test_next_turn_prefills_only_the_new_suffix(server_a, server_b):
    first = [{"role": "user", "content": "Say hello to Ann."}]
    reply = server_a.client().chat.completions.create(model=MODEL, messages=first, temperature=0, max_tokens=10)
    turn = [*first, {"role": "assistant", "content": reply.choices[0].message.content},
            {"role": "user", "content": "And to Bob?"}]
    second = server_a.client().chat.completions.create(model=MODEL, messages=turn, temperature=0, max_tokens=10)
    assert second.usage.prompt_tokens_details.cached_tokens >= reply.usage.prompt_tokens
    fresh = server_b.client(KEY).chat.completions.create(model=MODEL, messages=turn, temperature=0, max_tokens=10)
    assert fresh.usage.prompt_tokens_details.cached_tokens < reply.usage.prompt_tokens  # B never saw turn one
    assert second.choices[0].message.content == fresh.choices[0].message.content


def test_completions_models_logprobs_and_stop(server_a):
    client = server_a.client()
    assert [m.id for m in client.models.list().data] == [MODEL] and client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    done = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=6, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == done.usage.completion_tokens == 6 and "".join(lp.tokens) == done.choices[0].text
    pairs = zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    assert all(len(top) == 2 and max(top.values()) >= p - 1e-6 for top, p in pairs)
    answer = chat(client, "Count from 1 to 10, separated by commas.", 40, stop=[" 5"], logprobs=True, top_logprobs=3)
    assert answer.choices[0].finish_reason == "stop" and " 5" not in answer.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 for t in answer.choices[0].logprobs.content)


BIG = "hello " * 6000  # past the 4,096-token context
BAD = [  # (path, body: a dict, or raw bytes, status, param or code expected)
    ("chat", b"{not json", 400, "invalid_json"),
    ("chat", b"[1, 2]", 400, "invalid_json"),
    ("chat", {"model": MODEL}, 400, "messages"),
    ("chat", {"messages": "hi"}, 400, "messages"),
    ("chat", {"messages": []}, 400, "messages"),
    ("chat", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2.5}, 400,
     "max_completion_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, "seed"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 50}, 400,
     "top_logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "model"),
    ("chat", {"messages": [{"role": "user", "content": BIG}]}, 400, "context_length_exceeded"),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("completions", {"prompt": [1, -4]}, 400, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("chat", b"x" * (5 << 20), 413, "request_too_large"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_answering(server_a):
    for path, body, status, where in BAD:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = request(server_a, "POST", f"/v1/{'chat/completions' if path == 'chat' else path}", content)
        assert r.status == status, (body if len(content) < 200 else path, r.body)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], r.body
        assert where in (error["param"], error["code"]), (where, error)
    assert request(server_a, "GET", "/v1/chat/completions").status == 405
    with pytest.raises(openai.BadRequestError) as caught:  # the official client reads the error object
        chat(server_a.client(), "hi", 5, n=2)
    assert caught.value.body["param"] == "n"
    assert chat(server_a.client(), "Hi!", 5).choices[0].message.content


def open_stream(server: Server, max_tokens: int, headers: dict | None = None) -> HTTPResponse:
    """A streamed chat answer, its headers read; closing the response hangs up."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True,
            "max_tokens": max_tokens, "ignore_eos": True}
    conn = HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    assert response.status == 200
    return response


def hang_up(response: HTTPResponse) -> None:
    response.fp.raw._sock.shutdown(socket.SHUT_RDWR)
    response.close()


def _wait_for(server: Server, check, seconds: float = 20) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        health = server.health()
        if check(health) or time.monotonic() > deadline:
            return health
        time.sleep(0.2)


def test_a_disconnect_stops_its_generation(server_a):
    before = server_a.health()
    response = open_stream(server_a, 2000)
    events = 0
    while events < 4:
        events += response.readline().startswith(b"data: ")
    hang_up(response)
    after = _wait_for(server_a, lambda h: h["cancelled"] > before["cancelled"] and h["running"] == 0)
    assert after["cancelled"] == before["cancelled"] + 1 and after["running"] == 0
    assert after["generated_tokens"] - before["generated_tokens"] < 200  # far from its 2,000

    # a client waiting for a whole (not streamed) answer hangs up too
    before = after
    conn = HTTPConnection("127.0.0.1", server_a.port, timeout=60)
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 2000, "ignore_eos": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    _wait_for(server_a, lambda h: h["generated_tokens"] > before["generated_tokens"] + 3)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    after = _wait_for(server_a, lambda h: h["cancelled"] > before["cancelled"] and h["running"] == 0)
    assert after["cancelled"] == before["cancelled"] + 1 and after["running"] == 0
    assert after["generated_tokens"] - before["generated_tokens"] < 200  # far from its 2,000


def test_api_key_queue_bound_and_loopback_warning(server_b):
    assert request(server_b, "GET", "/v1/models").status == 401
    wrong = request(server_b, "GET", "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server_b.client("nope").models.list()
    assert server_b.client(KEY).models.list().data[0].id == MODEL

    auth = {"Authorization": f"Bearer {KEY}"}
    before = server_b.health()
    streams = [open_stream(server_b, 2000, auth) for _ in range(2)]  # B: one runs, one waits, a third is refused
    busy = request(server_b, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, auth)
    assert busy.status == 429 and busy.json()["error"]["code"] == "queue_full"
    for response in streams:
        hang_up(response)
    both_gone = before["cancelled"] + 2
    after = _wait_for(server_b, lambda h: h["running"] == h["waiting"] == 0 and h["cancelled"] >= both_gone)
    assert after["cancelled"] == before["cancelled"] + 2 and after["completed"] == before["completed"]

    # not on loopback: a warning; a port in use: one line, exit 1 (before loading anything)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        result = subprocess.run([*SERVE, "--host", "0.0.0.0", "--port", str(taken.getsockname()[1])],
                                capture_output=True, timeout=60, env=ENV, stdin=subprocess.DEVNULL)
    stderr = result.stderr.decode()
    assert result.returncode == 1 and "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[0].startswith("warning: listening on 0.0.0.0") and lines[-1].startswith("error: cannot listen")
