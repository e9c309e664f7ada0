"""`dsv4 chat`: a streaming terminal chat against a running dsv4 (or DeepSeek) server.

Thinking is printed dimmed, apart from the answer. `--model PATH` starts a local server first.
"""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

DIM, RESET = "\033[2m", "\033[0m"


def stream_chat(url: str, key: str | None, body: dict):
    """POST a streamed chat completion; yields (kind, text) with kind 'reasoning' or 'content'."""
    req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {key}"} if key else {})})
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"].get("message", "server error"))
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if delta.get("reasoning_content"):
                    yield "reasoning", delta["reasoning_content"]
                if delta.get("content"):
                    yield "content", delta["content"]


def _message(e: urllib.error.HTTPError) -> str:
    """An HTTP error's message: the API's JSON error body if there is one, else the status line."""
    try:
        body = json.loads(e.read())
        return f"{e.code}: {body['error']['message']}"
    except Exception:  # not the API's error shape
        return f"{e.code}: {e.reason}"


def chat_loop(url: str, key: str | None, model: str, thinking: bool, max_tokens: int, inp=None, out=None) -> int:
    inp, out = inp or sys.stdin, out or sys.stdout
    tty = out.isatty()
    messages: list = []
    out.write(f"dsv4 chat with {model} at {url} (empty line or /exit to quit)\n")
    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line or line.strip() in ("", "/exit"):
            out.write("\n" if not line else "")  # end of input: leave the prompt's line finished
            return 0
        messages.append({"role": "user", "content": line.rstrip("\n")})
        body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens,
                "thinking": {"type": "enabled" if thinking else "disabled"}}
        answer, reasoning, kind_now = "", "", None
        try:
            for kind, text in stream_chat(url, key, body):
                if kind != kind_now:
                    out.write(("\n" if kind_now else "") + ("[thinking] " if kind == "reasoning" else "[answer] "))
                    kind_now = kind
                out.write(f"{DIM}{text}{RESET}" if kind == "reasoning" and tty else text)
                out.flush()
                if kind == "reasoning":
                    reasoning += text
                else:
                    answer += text
        except urllib.error.HTTPError as e:  # the server's own message says what was wrong
            out.write(f"\n[error] {_message(e)}\n")
            messages.pop()
            continue
        except urllib.error.URLError as e:
            if kind_now is None and not messages[:-1] and isinstance(e.reason, ConnectionRefusedError):
                sys.stderr.write(f"dsv4: error: no server at {url} (start one with `dsv4 serve`, or pass "
                                 "--model PATH)\n")
                return 2
            out.write(f"\n[error] {e.reason}\n")
            messages.pop()
            continue
        except (RuntimeError, OSError, ValueError) as e:  # ValueError: e.g. http.client.InvalidURL
            out.write(f"\n[error] {e}\n")
            messages.pop()
            continue
        out.write("\n")
        messages.append({"role": "assistant", "content": answer, "reasoning_content": reasoning})
