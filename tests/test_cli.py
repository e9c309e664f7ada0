"""`dsv4 generate` and `dsv4 bench`: what they print equals the library calls they stand for (`dsv4 convert`:
test_convert.py)."""
import io
import json

import torch

import dsv4
from dsv4.cli import BUNDLED, main


def test_generate_prints_the_greedy_completions_of_the_library(capsys, monkeypatch):
    prompts = ["def add(a, b):", "The capital of France"]
    llm = dsv4.LLM(BUNDLED)
    want = [o.text for o in llm.generate(prompts, dsv4.SamplingParams(max_tokens=12, temperature=0))]
    assert main(["generate", *prompts, "--max-tokens", "12"]) == 0
    assert capsys.readouterr().out == "".join(t + "\n" for t in want)
    assert main(["generate", prompts[0], "--max-tokens", "12", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["prompt"] == prompts[0] and row["text"] == want[0] and len(row["token_ids"]) <= 12
    assert row["finish_reason"] in ("stop", "length")
    monkeypatch.setattr("sys.stdin", io.StringIO(prompts[1]))  # no prompt argument: one from stdin
    assert main(["generate", "--max-tokens", "12"]) == 0 and capsys.readouterr().out == want[1] + "\n"
    # sampled with a seed: the same text twice
    assert main(["generate", prompts[0], "--temperature", "1", "--seed", "7"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", prompts[0], "--temperature", "1", "--seed", "7"]) == 0
    assert capsys.readouterr().out == first


def test_generate_names_a_bad_option_or_prompt(capsys, tmp_path):
    for bad, named in ((["--top-p", "0"], "--top-p"), (["--max-tokens", "0"], "--max-tokens"),
                       (["--model", str(tmp_path / "none")], "not a checkpoint directory"),
                       (["--max-tokens", str(1 << 40)], "context length")):
        assert main(["generate", "hello", *bad]) == 2, bad
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, err


def test_bench_measures_the_engine_and_reports_the_state_it_holds(capsys):
    """dsv4 bench prints prefill and per-batch decode rates; the decode state it reports is what the engine's
    own estimate gives for that many sequences at that length (fixed part + allocated entry rows)."""
    from dsv4 import bench
    from dsv4.engine import LLMEngine

    model = dsv4.load_model(BUNDLED, dtype=torch.float32)
    lines = []
    r = bench.run(model, context=200, batches=(1, 3), tokens=4, write=lines.append)
    assert r["prefill_s"] > 0 and [d["batch"] for d in r["decode"]] == [1, 3]
    assert all(d["tok_s"] > 0 for d in r["decode"])
    eng = LLMEngine(model, config=dsv4.EngineConfig(prefix_block=0))
    n = 200 + 2 + 4  # prompt, the warm steps and the timed ones (the last token sampled, not yet computed)
    assert [d["state_bytes"] for d in r["decode"]] == [b * eng.estimate_bytes(n) for b in (1, 3)]
    assert r["state_per_token"] == eng.per_token
    assert any(ln.startswith("prefill 200 tokens") for ln in lines) and len(lines) == 6
    assert main(["bench", "--context", "64", "--batch", "2", "--tokens", "2"]) == 0
    assert "decode tok/s" in capsys.readouterr().out
    for bad in (["--batch", "1,x"], ["--batch", "0"], ["--tokens", "0"], ["--context", str(1 << 40)]):
        assert main(["bench", *bad]) == 2, bad
        err = capsys.readouterr().err
        assert "dsv4: error" in err and "Traceback" not in err
