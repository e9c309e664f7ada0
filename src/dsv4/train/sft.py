"""Chat/SFT data rendered with deepseek-recipe, exactly as the server renders requests, with the loss
masked to the assistant turn.

A target is what the model must emit after the rendered prompt: for thinking mode
`reasoning </think> reply <EOS>` (the prompt ends in `<think>`), otherwise `reply <EOS>` (the prompt
ends in `</think>`). A tool-call reply is the DSML block as deepseek-recipe renders it in history.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .tasks import Example

MODEL_ALIAS = "dsv4-train"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
ASSISTANT_NO_THINK = "<｜Assistant｜></think>"


class ChatRenderer:
    """Renders requests and assistant targets to token ids with a tokenizer.json."""

    def __init__(self, tokenizer_file):
        import deepseek_recipe as dr
        from tokenizers import Tokenizer

        self.dr = dr
        tokenizer_file = Path(tokenizer_file)
        if tokenizer_file.is_dir():
            tokenizer_file = tokenizer_file / "tokenizer.json"
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.encoding_tokenizer = dr.Tokenizer.from_file(str(tokenizer_file))
        self.encoding = dr.DeepseekV4Encoding().with_tokenizer(self.encoding_tokenizer)
        self.plain = dr.DeepseekV4Encoding()
        self.options = dr.ConversionOptions(reasoning_content_behavior=dr.ReasoningContentBehavior.Reject
                                            ).with_model_alias(MODEL_ALIAS, dr.ModelVersion.DeepseekV4Pro)

    def conversation(self, body: dict):
        return self.dr.ChatCompletionRequest(json.dumps({"model": MODEL_ALIAS, **body})).convert(self.options)

    def prompt_ids(self, body: dict) -> list:
        return list(self.encoding.encode(self.conversation(body).conversation))

    def parse(self, conv, token_ids: list, stopped: bool) -> dict:
        """The assistant message (content, reasoning_content, tool_calls) that the server's parser makes
        of generated tokens (EOS excluded); stopped: the model emitted EOS (else it ran out of tokens)."""
        dr = self.dr
        proc = dr.StreamProcessor(dr.ChatCompletionRequest.chunk_generator(conv, "x", MODEL_ALIAS),
                                  conv.parsing_options, self.encoding_tokenizer)
        resp = dr.ChatCompletionResponse("x", MODEL_ALIAS, 0, 0, 0)
        reason = dr.InferenceFinishReason.Stop if stopped else dr.InferenceFinishReason.Length
        chunks = [*proc.push(dr.InferenceChunk.ready(prompt_usage=dr.PromptUsage(prompt_tokens=0,
                                                                                 prompt_cache_hit_tokens=0)))]
        if token_ids:
            chunks += proc.push(dr.InferenceChunk.tokens(list(token_ids), None))
        if not proc.finished:
            chunks += [*proc.push(dr.InferenceChunk.finish(reason)), *proc.finish()]
        for c in chunks:
            resp.accumulate(c)
        msg = json.loads(resp.to_json())["choices"][0]["message"]
        calls = []
        for c in msg.get("tool_calls") or []:
            try:
                args = json.loads(c["function"]["arguments"])
            except (TypeError, ValueError):
                args = None
            calls.append({"name": c["function"]["name"], "arguments": args})
        return {"content": msg.get("content") or "", "reasoning_content": msg.get("reasoning_content"),
                "tool_calls": calls}

    def reply_text(self, ex: Example) -> str:
        """The assistant's visible reply: content, or the DSML tool-call block."""
        if ex.tool_call is None:
            return ex.content
        call = {"id": "call_0", "type": "function", "function": {
            "name": ex.tool_call["name"], "arguments": json.dumps(ex.tool_call["arguments"])}}
        body = {"messages": ex.body["messages"] + [
                    {"role": "assistant", "content": ex.content, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_0", "content": "-"}],
                "tools": ex.body.get("tools", []), "thinking": {"type": "disabled"}}
        text = self.plain.render_conversation(self.conversation(body).conversation).prompt
        end = text.rindex(EOS)
        return text[text.rindex(ASSISTANT_NO_THINK, 0, end) + len(ASSISTANT_NO_THINK):end]

    def target_text(self, ex: Example) -> str:
        thinking = ex.body.get("thinking", {}).get("type") != "disabled"
        reply = self.reply_text(ex)
        return f"{ex.reasoning or ''}</think>{reply}{EOS}" if thinking else f"{reply}{EOS}"

    def example_ids(self, ex: Example) -> tuple[list, list]:
        """(ids, mask): prompt tokens with mask 0, then the target's tokens with mask 1."""
        prompt = self.prompt_ids(ex.body)
        target = self.tokenizer.encode(self.target_text(ex), add_special_tokens=False).ids
        return prompt + target, [0] * len(prompt) + [1] * len(target)


def build_sft_corpus(examples: list, renderer: ChatRenderer, seq_len: int, pad: int, seed: int = 0):
    """Examples packed whole into rows of seq_len + 1 tokens (first fit, longest first; padded with `pad`
    under mask 0), rows shuffled. Every example starts with BOS, so each is a fresh conversation.

    Returns (tokens int32 [R*(seq_len+1)], mask uint8 [same], dropped: examples longer than a row)."""
    width = seq_len + 1
    items, dropped, shortest = [], 0, None
    for ex in examples:
        ids, m = renderer.example_ids(ex)
        if len(ids) > width:
            dropped += 1
            shortest = len(ids) if shortest is None else min(shortest, len(ids))
        else:
            items.append((ids, m))
    if not items:
        raise ValueError(f"no example fits in a row of seq_len + 1 = {width} tokens (the shortest of "
                         f"{len(examples)} has {shortest})")
    items.sort(key=lambda it: -len(it[0]))
    rows: list = []  # [ids, mask]
    for ids, m in items:
        for row in rows:
            if len(row[0]) + len(ids) <= width:
                row[0].extend(ids)
                row[1].extend(m)
                break
        else:
            rows.append([list(ids), list(m)])
    order = np.random.default_rng(seed).permutation(len(rows))
    tokens = np.full((len(rows), width), pad, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=np.uint8)
    for r, i in enumerate(order):
        ids, m = rows[i]
        tokens[r, :len(ids)] = ids
        mask[r, :len(m)] = m
    return tokens.reshape(-1), mask.reshape(-1), dropped
