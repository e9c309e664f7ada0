"""Generated chat tasks with verifiable answers: the SFT data, the RL rewards and the held-out evaluation
of dsv4-tiny. Each example is an OpenAI-style request body plus the assistant turn it should produce.

Kinds: `add` (arithmetic; thinking shows the sum), `tool` (call one of several tools with the right
arguments; a second example answers from the tool's result), `json` (extract fields into a JSON object,
response_format json_object), `chat` (greetings and identity), `code` (a small Python function), `echo`
(repeat a short phrase of names, places and numbers exactly: a copying drill).
`split="train"` and `split="heldout"` draw from disjoint cities, names and number pairs.
"""
from __future__ import annotations

import json
import random
import re
import zlib
from dataclasses import dataclass, field

from ..config import ConfigError, is_number

CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima", "Oslo", "Seoul", "Delhi",
          "Dublin", "Lisbon", "Vienna", "Prague", "Warsaw", "Athens", "Bangkok", "Nairobi", "Toronto", "Sydney",
          "Boston", "Denver", "Chicago", "Austin", "Munich", "Milan", "Zurich", "Geneva", "Quito", "Bogota",
          "Hanoi", "Manila", "Jakarta", "Dakar", "Accra", "Tunis", "Riga", "Tallinn", "Helsinki"]
NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Liam",
         "Maria", "Noah", "Olivia", "Peter", "Quinn", "Rosa", "Sam", "Tina", "Uma", "Victor", "Wendy", "Xavier",
         "Yara", "Zoe", "Omar", "Lena", "Hugo", "Nina"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CNY", "CHF"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]
JOBS = ["teacher", "engineer", "doctor", "pilot", "chef", "writer", "farmer", "nurse"]


def _fn(name, description, props, types):
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {p: {"type": t, "description": d}
                                                        for p, (t, d) in zip(props, types)},
                       "required": list(props)}}}


TOOLS = {
    "get_weather": _fn("get_weather", "Get the current weather in a city", ["city"], [("string", "City name")]),
    "get_time": _fn("get_time", "Get the local time in a city", ["city"], [("string", "City name")]),
    "convert_currency": _fn("convert_currency", "Convert an amount of money between currencies",
                            ["amount", "source", "target"],
                            [("number", "Amount to convert"), ("string", "Currency code to convert from"),
                             ("string", "Currency code to convert to")]),
}


@dataclass
class Example:
    """A request body (without `model`) and the assistant turn that answers it."""
    kind: str
    body: dict
    reasoning: str | None = None  # thinking text when body enables thinking
    content: str = ""
    tool_call: dict | None = None  # {"name": ..., "arguments": {...}}
    answer: object = None  # what a verifier compares against
    meta: dict = field(default_factory=dict)


def _held(key: str) -> bool:
    """Deterministic 1-in-5 held-out membership of an entity or pair."""
    return zlib.crc32(key.encode()) % 5 == 0


SYLLABLES = ["ka", "lo", "mi", "ra", "ven", "dor", "sa", "ti", "bel", "mar", "no", "zu", "fi", "gor", "le", "pa",
             "qui", "ron", "tes", "wa", "xi", "yo", "dan", "ru"]


def _invented(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def _pick(rng: random.Random, items: list, split: str) -> str:
    """A real name of the split, or (training, half the time) an invented one: replies must copy the
    entity from the request rather than recall a memorised few."""
    if split == "train" and rng.random() < 0.5:
        return _invented(rng)
    pool = [x for x in items if _held(x) == (split == "heldout")]
    return rng.choice(pool)


def _thinking(rng: random.Random, body: dict, force: bool | None = None) -> bool:
    on = rng.random() < 0.5 if force is None else force
    body["thinking"] = {"type": "enabled" if on else "disabled"}
    if on and rng.random() < 0.5:
        body["reasoning_effort"] = rng.choice(["high", "max"])
    return on


def make_add(rng: random.Random, split: str) -> Example:
    while True:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if _held(f"{min(a, b)}+{max(a, b)}") == (split == "heldout"):  # a + b and b + a in one split
            break
    q = rng.choice(["What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?", "Add {a} and {b}.",
                    "What do you get when you add {a} and {b}?"]).format(a=a, b=b)
    body = {"messages": [{"role": "user", "content": q}]}
    think = _thinking(rng, body)
    s = a + b
    ones = (a % 10) + (b % 10)
    reasoning = (f"I need to add {a} and {b}. Ones: {a % 10} + {b % 10} = {ones}. "
                 f"Tens: {a // 10} + {b // 10} + {ones // 10} = {a // 10 + b // 10 + ones // 10}. So {a} + {b} = {s}.")
    return Example("add", body, reasoning if think else None, f"{a} + {b} = {s}.", answer=s)


def make_tool(rng: random.Random, split: str) -> list:
    """Two examples: the call, and the answer after the tool's result."""
    name = rng.choice(list(TOOLS))
    others = [t for t in TOOLS if t != name]
    offered = [name] + rng.sample(others, rng.randint(0, len(others)))
    rng.shuffle(offered)
    city = _pick(rng, CITIES, split)
    if name == "get_weather":
        q = rng.choice(["What's the weather in {c}?", "How is the weather in {c} today?", "Is it raining in {c}?",
                        "Weather for {c}, please."]).format(c=city)
        args = {"city": city}
        temp, cond = rng.randint(-5, 35), rng.choice(CONDITIONS)
        result = json.dumps({"city": city, "temperature_c": temp, "condition": cond})
        final = f"It is {temp}°C and {cond} in {city}."
        why = f"The user wants the weather in {city}. I will call get_weather with city {city}."
    elif name == "get_time":
        q = rng.choice(["What time is it in {c}?", "Tell me the local time in {c}.", "Current time in {c}?"]
                       ).format(c=city)
        args = {"city": city}
        hh, mm = rng.randint(0, 23), rng.randint(0, 59)
        result = json.dumps({"city": city, "time": f"{hh:02d}:{mm:02d}"})
        final = f"The local time in {city} is {hh:02d}:{mm:02d}."
        why = f"The user wants the time in {city}. I will call get_time with city {city}."
    else:
        while True:
            amount = rng.choice([rng.randint(1, 999), rng.randint(1, 99) * 10])
            src, dst = rng.sample(CURRENCIES, 2)
            if _held(f"{src}{dst}{amount % 7}") == (split == "heldout"):
                break
        q = rng.choice(["Convert {a} {s} to {d}.", "How much is {a} {s} in {d}?", "Change {a} {s} into {d}, please."]
                       ).format(a=amount, s=src, d=dst)
        args = {"amount": amount, "source": src, "target": dst}
        rate = round(rng.uniform(0.5, 2.0), 2)
        result = json.dumps({"amount": round(amount * rate, 2), "currency": dst})
        final = f"{amount} {src} is {round(amount * rate, 2)} {dst}."
        why = f"The user wants to convert {amount} {src} to {dst}. I will call convert_currency."
    tools = [TOOLS[t] for t in offered]
    body = {"messages": [{"role": "user", "content": q}], "tools": tools}
    think = _thinking(rng, body)
    call = Example("tool", body, why if think else None, "", {"name": name, "arguments": args},
                   answer={"name": name, "arguments": args})
    turn = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}
    if think:  # thinking mode: the reasoning of a tool-calling turn is passed back
        turn["reasoning_content"] = why
    history = [{"role": "user", "content": q}, turn, {"role": "tool", "tool_call_id": "call_0", "content": result}]
    body2 = {"messages": history, "tools": tools, "thinking": body["thinking"]}
    if "reasoning_effort" in body:
        body2["reasoning_effort"] = body["reasoning_effort"]
    reply = Example("tool_result", body2, "The tool returned the result. I will report it." if think else None,
                    final, answer=final)
    return [call, reply]


def make_json(rng: random.Random, split: str) -> Example:
    name, job = _pick(rng, NAMES, split), rng.choice(JOBS)
    age = rng.randint(18, 90)
    city = _pick(rng, CITIES, split)
    fields_ = rng.choice([["name", "age"], ["name", "city"], ["name", "age", "city"], ["name", "job"],
                          ["name", "age", "job"]])
    facts = {"name": name, "age": age, "city": city, "job": job}
    text = rng.choice([f"{name} is a {age}-year-old {job} who lives in {city}.",
                       f"{name} lives in {city}, works as a {job} and is {age} years old."])
    q = f"Return a JSON object with the fields {', '.join(fields_)} for this person: {text}"
    body = {"messages": [{"role": "user", "content": q}], "response_format": {"type": "json_object"},
            "thinking": {"type": "disabled"}}
    obj = {f: facts[f] for f in fields_}
    return Example("json", body, None, json.dumps(obj), answer=obj)


CHAT = [
    (["Hello", "Hi", "Hi there!", "Hey", "Good morning"], "Hello! How can I help you today?"),
    (["Who are you?", "What are you?", "Introduce yourself."],
     "I am dsv4-tiny, a very small DeepSeek-V4 model trained by dsv4 on a laptop CPU."),
    (["Thank you", "Thanks!", "Thanks a lot"], "You're welcome!"),
    (["What can you do?", "How can you help me?"],
     "I can add numbers, call tools such as weather, time and currency conversion, return JSON and write small "
     "Python functions."),
]
# Phrasings only the held-out split uses (chat and code have no entities to hold out; these test that a
# reply follows the meaning of the request, not its memorised wording); HELDOUT_CHAT has one list per CHAT entry.
HELDOUT_CHAT = [["Hello there", "Good evening"], ["Tell me about yourself."], ["Thank you very much"],
                ["What are you able to do?"]]
CODE_ASKS = ["Write a Python function that returns the {w} of two numbers.",
             "Python: a function computing the {w} of a and b."]
HELDOUT_CODE = ["Give me a Python function for the {w} of a and b.",
                "Define a Python function that computes the {w} of two numbers."]
OPS = {"sum": ("add", "a + b"), "difference": ("subtract", "a - b"), "product": ("multiply", "a * b"),
       "maximum": ("maximum", "max(a, b)"), "minimum": ("minimum", "min(a, b)")}


def make_chat(rng: random.Random, split: str) -> Example:
    i = rng.randrange(len(CHAT))
    qs, a = CHAT[i]
    if split == "heldout":
        qs = qs + HELDOUT_CHAT[i] * len(qs)  # unseen wordings: half the held-out prompts (greetings: 2 in 3)
    body = {"messages": [{"role": "user", "content": rng.choice(qs)}]}
    think = _thinking(rng, body)
    return Example("chat", body, "The user is chatting with me. I will reply briefly." if think else None, a,
                   answer=a)


def make_code(rng: random.Random, split: str) -> Example:
    what, (fname, expr) = rng.choice(list(OPS.items()))
    q = rng.choice(CODE_ASKS + (HELDOUT_CODE if split == "heldout" else [])).format(w=what)
    body = {"messages": [{"role": "user", "content": q}]}
    think = _thinking(rng, body)
    code = f"```python\ndef {fname}(a, b):\n    return {expr}\n```"
    return Example("code", body, f"The function takes a and b and returns {expr}." if think else None, code,
                   answer=expr)


def make_echo(rng: random.Random, split: str) -> Example:
    """Repeat a phrase of 1-4 names, places, numbers and currency codes: only copying the request solves it."""
    parts = []
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        parts.append(_pick(rng, CITIES, split) if r < 0.35 else _pick(rng, NAMES, split) if r < 0.7
                     else str(rng.randint(0, 999)) if r < 0.85 else rng.choice(CURRENCIES + JOBS))
    phrase = " ".join(parts)
    q = rng.choice(["Repeat after me: {p}", "Say exactly this: {p}", "Copy this text: {p}", "Echo: {p}",
                    "Please repeat \"{p}\"."]).format(p=phrase)
    body = {"messages": [{"role": "user", "content": q}]}
    think = _thinking(rng, body)
    return Example("echo", body, f"The user wants me to repeat {phrase}." if think else None, phrase,
                   answer=phrase)


MAKERS = {"add": make_add, "tool": make_tool, "json": make_json, "chat": make_chat, "code": make_code,
          "echo": make_echo}


def check_mix(mix, where: str) -> None:
    """A task mix (kind -> weight) is a non-empty table of known kinds with weights >= 0, not all zero."""
    ok = (isinstance(mix, dict) and mix and set(mix) <= set(MAKERS) and all(is_number(w) for w in mix.values())
          and sum(mix.values()) > 0)
    if not ok:
        raise ConfigError(f"config {where}: expected a table of task kinds ({', '.join(MAKERS)}) to weights >= 0, "
                          f"not all zero (got {mix!r})")


def generate(n: int, seed: int = 0, split: str = "train", mix: dict | None = None) -> list:
    """n task draws (a tool draw gives two examples) from the kinds in `mix` (kind -> weight)."""
    mix = mix or {"add": 3, "tool": 4, "json": 2, "chat": 1, "code": 1}
    rng = random.Random(f"{seed}-{split}")
    kinds, weights = zip(*mix.items())
    out = []
    for _ in range(n):
        ex = MAKERS[rng.choices(kinds, weights)[0]](rng, split)
        out.extend(ex if isinstance(ex, list) else [ex])
    return out


# ---- verification of a parsed reply ----
def score(ex: Example, content: str, tool_calls: list) -> float:
    """1.0 if the reply (content and parsed tool calls [{"name", "arguments": dict}]) solves ex, else 0.0."""
    if ex.kind == "add":
        nums = re.findall(r"-?\d+", content or "")
        return float(bool(nums) and int(nums[-1]) == ex.answer and not tool_calls)
    if ex.kind == "tool":
        return float(len(tool_calls) == 1 and tool_calls[0]["name"] == ex.answer["name"]
                     and tool_calls[0]["arguments"] == ex.answer["arguments"])
    if ex.kind == "json":
        try:
            return float(json.loads(content) == ex.answer)
        except (TypeError, ValueError):
            return 0.0
    if ex.kind == "tool_result":
        # the numbers and place of the tool's result are restated
        return float(_facts(ex.answer) - {"is", "in", "and", "The", "local", "time", "It"} <= _facts(content))
    return float((content or "").strip() == str(ex.content).strip())


def _facts(text: str | None) -> set:
    """The words and numbers of a sentence ("20:22", "1.5", "Paris"), without the punctuation that ends it."""
    return set(re.findall(r"[\w.:-]*\w", text or ""))


def reward(ex: Example, content: str, tool_calls: list) -> float:
    """Partial credit in [0, 1] (the RL reward): 1 where `score` is 1; otherwise the share of the answer
    that is right (JSON fields, tool name and arguments, restated facts, the sum's last digit)."""
    if score(ex, content, tool_calls):
        return 1.0
    if ex.kind == "add":
        nums = re.findall(r"-?\d+", content or "")
        return 0.25 if nums and int(nums[-1]) % 10 == ex.answer % 10 else 0.0
    if ex.kind == "json":
        try:
            got = json.loads(content)
        except (TypeError, ValueError):
            return 0.0
        if not isinstance(got, dict):
            return 0.0
        right = sum(got.get(k) == v for k, v in ex.answer.items()) - 0.5 * len(set(got) - set(ex.answer))
        return max(0.0, right / len(ex.answer)) * 0.9
    if ex.kind == "tool":
        if len(tool_calls) != 1 or tool_calls[0]["name"] != ex.answer["name"]:
            return 0.0
        args = tool_calls[0]["arguments"] if isinstance(tool_calls[0]["arguments"], dict) else {}
        want = ex.answer["arguments"]
        return 0.5 + 0.4 * sum(args.get(k) == v for k, v in want.items()) / len(want)
    if ex.kind == "tool_result":
        want = _facts(ex.answer)
        return 0.9 * len(want & _facts(content)) / len(want)
    if ex.kind == "code":  # the function's name and its return expression
        name = ex.content.split("def ", 1)[1].split("(", 1)[0]
        return 0.45 * (f"def {name}(" in (content or "")) + 0.45 * (f"return {ex.answer}\n" in (content or ""))
    if ex.kind == "echo":
        want, got = ex.answer.split(), (content or "").split()
        return 0.9 * sum(a == b for a, b in zip(want, got)) / max(len(want), len(got))
    return 0.0
