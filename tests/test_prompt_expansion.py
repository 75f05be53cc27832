"""Prompt expansion: the offline toy backend and the chat-completions client (loopback server only)."""

import http.server
import json
import threading

import pytest

from sora_jax.data import captions, prompt_expansion
from sora_jax.data.prompt_expansion import ChatCompletionsExpander, expand_prompt, expand_prompt_with_info, get_expander
from sora_jax.data.tokenizer import HashTokenizer


def test_toy_expansion_keeps_the_prompt_and_fills_the_rest():
    caption, info = expand_prompt_with_info("a red circle bouncing", seed=3)
    words = caption.lower()
    assert "red circle" in words and ("bounces" in words or "bouncing" in words)
    assert len(caption.split()) > 15
    assert any(f.startswith("object 0 size=") for f in info["filled"])
    assert any(f.startswith("background colour=") for f in info["filled"])
    assert info["parsed"]["objects"] == [{"color": "red", "shape": "circle", "motion": "bouncing"}]
    assert captions.missing_facts(caption, [tuple(f) for f in info["facts"]]) == []
    assert expand_prompt("a red circle bouncing", seed=3) == caption  # deterministic
    assert len({expand_prompt("a red circle bouncing", seed=s) for s in range(6)}) >= 4  # varied across seeds


@pytest.mark.parametrize("prompt,must,must_not", [
    ("a big blue square falling and a green triangle moving left, camera panning right",
     ["large blue square", "green triangle", "pans to the right", "to the left"], []),
    ("a picture of a yellow diamond on a checkered navy and black background",
     ["yellow diamond", "navy", "black", "check"], ["bounces", "falls", "pans"]),
    ("a pink ball leaving a trail and passing behind a bar", ["pink circle", "trail", "behind"], []),
    ("", ["one"], []),
])
def test_toy_expansion_cases(prompt, must, must_not):
    caption = expand_prompt(prompt, seed=0).lower()
    for m in must:
        assert m in caption, (m, caption)
    for m in must_not:
        assert m not in caption, (m, caption)
    tok = HashTokenizer(8192)
    assert set(tok.pieces(caption)) <= captions.caption_vocabulary()


def test_factory():
    assert isinstance(get_expander("toy"), prompt_expansion.ToyExpander)
    assert get_expander("toy")("a red circle", seed=1) == expand_prompt("a red circle", seed=1)
    e = get_expander("openai", base_url="http://127.0.0.1:1/v1", model="m")
    assert isinstance(e, ChatCompletionsExpander) and e.url == "http://127.0.0.1:1/v1/chat/completions"
    with pytest.raises(ValueError, match="unknown prompt expander"):
        get_expander("gpt")


class _Handler(http.server.BaseHTTPRequestHandler):
    seen = []
    status = 200

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.seen.append((self.path, dict(self.headers), body))
        reply = {"choices": [{"message": {"role": "assistant", "content": '  "A small red circle bounces."\n'}}]}
        data = json.dumps(reply if _Handler.status == 200 else {"error": "boom"}).encode()
        self.send_response(_Handler.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.seen.clear()
    _Handler.status = 200
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_chat_completions_client(server, monkeypatch):
    monkeypatch.setenv("TEST_EXPANDER_KEY", "sk-secret-123")
    expander = ChatCompletionsExpander(server, model="tiny-model", api_key_env="TEST_EXPANDER_KEY")
    assert expander.expand("a red circle", seed=5) == "A small red circle bounces."
    path, headers, body = _Handler.seen[-1]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-secret-123"
    assert body["model"] == "tiny-model" and body["seed"] == 5
    assert body["messages"][0]["role"] == "system" and "caption" in body["messages"][0]["content"]
    assert body["messages"][1] == {"role": "user", "content": "a red circle"}
    assert "sk-secret" not in repr(expander) and "sk-secret" not in str(vars(expander))

    monkeypatch.delenv("TEST_EXPANDER_KEY")
    expander("a blue square")
    assert "Authorization" not in _Handler.seen[-1][1]  # no key: no header


def test_chat_completions_errors_do_not_leak_the_key(server, monkeypatch):
    monkeypatch.setenv("TEST_EXPANDER_KEY", "sk-secret-456")
    _Handler.status = 500
    expander = ChatCompletionsExpander(server, model="m", api_key_env="TEST_EXPANDER_KEY")
    with pytest.raises(RuntimeError, match="HTTP 500") as info:
        expander.expand("a red circle")
    assert "sk-secret" not in str(info.value)
    with pytest.raises(RuntimeError, match="failed"):
        ChatCompletionsExpander("http://127.0.0.1:9/v1", model="m", timeout=2).expand("x")
