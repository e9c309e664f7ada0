"""`dsv4 generate` and `dsv4 bench`: what they print equals the library calls they stand for; each subcommand's
options reach what they configure, and bad ones are refused by name (rc 2) before anything runs (`dsv4 convert`'s
equality with the writers: test_convert.py; `dsv4 serve`'s engine options: test_bundled.py)."""
import io
import json
import os

import pytest
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


def test_generate_passes_stop_strings_and_ignore_eos_to_the_engine(capsys):
    """--stop and --ignore-eos give what the library gives with the same settings: a completion cut before
    the stop string (finish "stop"), and one that runs on past the end-of-sequence token to --max-tokens."""
    llm = dsv4.LLM(BUNDLED)

    def cli_json(*argv):
        assert main(["generate", *argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    prompt = "def add(a, b):"  # greedy: "\n    return a * b ..." on the bundled model
    free = llm.generate([prompt], dsv4.SamplingParams(max_tokens=12, temperature=0))[0].text
    assert "return" in free
    want = llm.generate([prompt], dsv4.SamplingParams(max_tokens=12, temperature=0, stop=["return"]))[0]
    row = cli_json(prompt, "--max-tokens", "12", "--stop", "return")
    assert row["text"] == want.text == free[:free.index("return")] and row["finish_reason"] == "stop"
    assert row["token_ids"] == want.token_ids

    prompt = "The capital of France"  # greedy: the end-of-sequence token after 8 tokens
    ended = llm.generate([prompt], dsv4.SamplingParams(max_tokens=12, temperature=0))[0]
    assert ended.finish_reason == "stop" and len(ended.token_ids) < 12
    want = llm.generate([prompt], dsv4.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    row = cli_json(prompt, "--max-tokens", "12", "--ignore-eos")
    assert row["finish_reason"] == "length" and len(row["token_ids"]) == 12
    assert row["token_ids"] == want.token_ids and row["text"] == want.text


def test_chat_passes_no_thinking_to_the_chat_loop(monkeypatch):
    import dsv4.chat

    calls = []
    monkeypatch.setattr(dsv4.chat, "chat_loop", lambda *a: calls.append(a) or 0)
    assert main(["chat", "--url", "http://h:1", "--api-key", "k", "--served-model-name", "m", "--max-tokens", "7",
                 "--no-thinking"]) == 0
    assert main(["chat", "--url", "http://h:1"]) == 0
    assert calls == [("http://h:1", "k", "m", False, 7), ("http://h:1", None, "deepseek-v4-flash", True, 512)]


def test_serve_refuses_a_key_file_without_keys_and_bad_numbers_before_serving(monkeypatch, tmp_path, capsys):
    """An --api-key-file with no keys is an error, never a server without authentication; a negative or NaN
    --balance-usd, a zero --kv-budget-gib or port 65536 are refused by name. The last accepted port serves."""
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append((app, kw)))
    empty = tmp_path / "keys"
    empty.write_text("\n   \n\n")
    for bad, named in ((["--api-key-file", str(empty)], "no API keys"),
                       (["--balance-usd", "-5"], "--balance-usd"), (["--balance-usd", "nan"], "--balance-usd"),
                       (["--kv-budget-gib", "0"], "--kv-budget-gib"), (["--kv-budget-gib", "-1"], "--kv-budget-gib")):
        assert main(["serve", *bad]) == 2, bad
        err = capsys.readouterr().err
        assert "dsv4: error" in err and named in err and "Traceback" not in err, err
    assert served == []
    with pytest.raises(SystemExit) as e:  # argparse: usage and the reason
        main(["serve", "--port", "65536"])
    assert e.value.code == 2 and "65536" in capsys.readouterr().err and served == []
    assert main(["serve", "--port", "65535"]) == 0
    app, kw = served.pop()
    app.state.llm.close()
    assert kw["port"] == 65535


def test_inspect_and_bench_refuse_a_context_of_zero_by_name(capsys):
    for argv in (["inspect", "tiny", "--context", "0"], ["bench", "--context", "0", "--batch", "1", "--tokens", "1"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "dsv4: error" in err and "--context" in err and "Traceback" not in err, err


def test_a_reader_that_leaves_early_ends_with_status_1_and_no_traceback(monkeypatch, tmp_path, capsys):
    """`dsv4 inspect flash | head`: the write fails with a broken pipe; dsv4 exits 1 (as a process killed by
    SIGPIPE would fail the pipeline), quietly: stdout goes to /dev/null so the exit flush cannot fail again."""
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)

    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return fd

    monkeypatch.setattr("sys.stdout", Gone())
    try:
        assert main(["inspect", "flash"]) == 1
        os.write(fd, b"after")  # fd now points at /dev/null
    finally:
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == b""
    assert "Traceback" not in capsys.readouterr().err


def test_convert_no_fp8_and_no_fp4_each_keep_only_their_own_weights_unquantised(tmp_path):
    """--no-fp8 alone: linear weights in BF16, routed experts still FP4 (packed int8 + E8M0 scales); --no-fp4
    alone: the reverse. The written config says the same."""
    from safetensors import safe_open

    def dtypes(path):  # (expert weight?, dtype) of every .weight tensor written
        seen = set()
        for shard in path.glob("*.safetensors"):
            with safe_open(shard, "pt") as f:
                names = [k for k in f.keys() if k.endswith(".weight")]  # noqa: SIM118 (not iterable)
                seen |= {(".experts." in k, f.get_slice(k).get_dtype()) for k in names}
        return seen

    for flag, dtype, expert_dtype, want in (
            ("--no-fp8", "bf16", "fp4", {(True, "I8"), (False, "BF16")}),
            ("--no-fp4", "fp8", "bf16", {(True, "BF16"), (False, "BF16"), (False, "F8_E4M3")})):
        out = tmp_path / flag
        assert main(["convert", str(BUNDLED), str(out), "--to", "official", flag]) == 0
        config = json.loads((out / "config.json").read_text())
        assert (config["dtype"], config["expert_dtype"]) == (dtype, expert_dtype), flag
        assert dtypes(out) == want, flag
