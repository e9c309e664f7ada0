"""The README's first requests against `dsv4 serve` (the bundled dsv4-tiny) with the official openai SDK:
a streamed FIM completion, a tool call, a JSON-mode answer and a thinking answer.

    python examples/first_requests.py [--base-url http://127.0.0.1:8000]
"""
import argparse
import json

from openai import OpenAI

ap = argparse.ArgumentParser()
ap.add_argument("--base-url", default="http://127.0.0.1:8000")
base = ap.parse_args().base_url
client = OpenAI(base_url=base, api_key="none")

# 1. fill in the middle (DeepSeek's /beta completions), streamed
beta = OpenAI(base_url=f"{base}/beta", api_key="none")
stream = beta.completions.create(model="deepseek-v4-flash", prompt="def fib(n):\n    if n < 2:\n        return n\n",
                                 suffix="\n\nprint(fib(10))\n", max_tokens=32, temperature=0, stream=True)
print("FIM:", repr("".join(chunk.choices[0].text for chunk in stream)))

# 2. a tool call (without thinking, so temperature 0 is greedy and the call repeats exactly)
weather = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
r = client.chat.completions.create(model="deepseek-chat", tools=[weather], temperature=0,
                                   messages=[{"role": "user", "content": "How is the weather in Vienna today?"}])
msg = r.choices[0].message
if msg.tool_calls:
    print("tool call:", msg.tool_calls[0].function.name, json.loads(msg.tool_calls[0].function.arguments))
else:  # the model may also answer in text
    print("reply:", msg.content)

# 3. JSON mode (dsv4-tiny learnt JSON answers without thinking)
r = client.chat.completions.create(
    model="deepseek-chat", response_format={"type": "json_object"}, temperature=0,
    messages=[{"role": "user", "content": "Return a JSON object with the fields name, city for this person: "
                                          "Nina lives in Quito, works as a chef and is 41 years old."}])
print("JSON:", json.loads(r.choices[0].message.content))

# 4. thinking (sampled: in thinking mode DeepSeek's API ignores temperature, and so does dsv4)
r = client.chat.completions.create(model="deepseek-reasoner",
                                   messages=[{"role": "user", "content": "Who are you?"}])
print("reasoning:", r.choices[0].message.reasoning_content)
print("answer:", r.choices[0].message.content)
