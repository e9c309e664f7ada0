"""`dsv4 train CONFIG`: a run writes metrics, a plot, checkpoints and a servable model; killed runs resume exactly."""
import json
import shutil
import sysconfig
from pathlib import Path

import pytest

import dsv4
from dsv4.cli import main
from dsv4.tokenizer import load_tokenizer
from dsv4.train import TrainConfig
from dsv4.train.trainer import Trainer
from helpers import assert_resume_refused

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def write_config(tmp_path, run):
    cfg = tmp_path / f"{run}.toml"
    cfg.write_text(f"""
[model]
preset = "tiny"
num_hidden_layers = 2
layer_types = ["sliding_attention", "compressed_sparse_attention"]

[data]
files = ["{STDLIB}/abc.py", "{STDLIB}/bisect.py", "{STDLIB}/colorsys.py"]
vocab_size = 400
fim_rate = 0.5
val_fraction = 0.1

[train]
steps = 6
batch_size = 2
seq_len = 32
warmup = 1
checkpoint_every = 2
out = "{tmp_path / run}"
""")
    return cfg


def losses(run: Path):
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]


class Killed(Exception):
    pass


def test_train_run_writes_everything_and_resumes_exactly(tmp_path, monkeypatch):
    assert main(["train", str(write_config(tmp_path, "straight"))]) == 0
    straight = tmp_path / "straight"
    assert (straight / "loss.png").stat().st_size > 1000
    assert (straight / "model" / "config.json").exists() and (straight / "model" / "tokenizer.json").exists()
    assert len(losses(straight)) == 6
    # killed after 3 steps (checkpoint at step 2) in the middle of writing a row, resumed, killed again right
    # after the checkpoint of step 4, resumed: the same rows (validation included), bit for bit, each once
    cfg = write_config(tmp_path, "killed")
    assert main(["train", str(cfg), "--stop-after", "3"]) == 0
    assert len(losses(tmp_path / "killed")) == 3
    metrics = tmp_path / "killed" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"loss": 5.9')
    save = Trainer.save

    def save_then_die(self, path):
        save(self, path)
        if self.step_count == 4:
            raise Killed

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(Killed):
        main(["train", str(cfg), "--resume"])
    monkeypatch.undo()
    assert main(["train", str(cfg), "--resume"]) == 0

    def rows(run):
        return [(r["step"], r["loss"], r.get("val_loss")) for r in map(json.loads, (run / "metrics.jsonl").open())]

    assert rows(tmp_path / "killed") == rows(straight) and rows(straight)[3][2] is not None
    import dsv4
    model = dsv4.load_model(straight / "model")
    assert model.config.vocab_size == 400


def test_a_yaml_config_trains_as_its_toml_twin(tmp_path, capsys):
    """The same tables written as YAML (.yaml / .yml) give the same run, loss for loss; malformed YAML or a
    YAML file that is not a mapping of tables is a clear error (rc 2) naming the file."""
    import tomllib

    import yaml

    toml_cfg = write_config(tmp_path, "as_toml")
    spec = tomllib.loads(toml_cfg.read_text())
    spec["train"]["out"] = str(tmp_path / "as_yaml")
    yaml_cfg = tmp_path / "as_yaml.yml"
    yaml_cfg.write_text(yaml.safe_dump(spec))
    for cfg in (toml_cfg, yaml_cfg):
        assert main(["train", str(cfg), "--stop-after", "2"]) == 0
    assert len(losses(tmp_path / "as_yaml")) == 2 and losses(tmp_path / "as_yaml") == losses(tmp_path / "as_toml")
    for text, named in (("train: [steps: 2", "not valid YAML"), ("- model\n- train\n", "mapping of tables"),
                        ("train: {steps: 2, stepz: 3}\n", "stepz")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        assert main(["train", str(bad)]) == 2
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err


def test_tensorboard_option_logs_or_names_the_missing_package(tmp_path, capsys):
    import importlib.util

    cfg = write_config(tmp_path, "tb")
    cfg.write_text(cfg.read_text().replace("[train]", "[train]\ntensorboard = true"))
    rc = main(["train", str(cfg)])
    if importlib.util.find_spec("tensorboard") is None:
        assert rc == 2 and "pip install tensorboard" in capsys.readouterr().err
        assert not (tmp_path / "tb").exists()  # refused before the tokenizer and corpus were built
    else:
        assert rc == 0 and any((tmp_path / "tb" / "tensorboard").iterdir())


def sft_config(tmp_path, data: str, steps: int, seq_len: int):
    """Train the base run, then write an SFT config starting from it; `data`: extra [data] lines."""
    assert main(["train", str(write_config(tmp_path, "base"))]) == 0
    cfg = tmp_path / "sft.toml"
    cfg.write_text(f"""
[model]
init = "{tmp_path / 'base' / 'model'}"
[data]
kind = "chat"
examples = 30
{data}
[train]
steps = {steps}
batch_size = 2
seq_len = {seq_len}
out = "{tmp_path / 'sft'}"
""")
    return cfg


def test_sft_config_trains_on_assistant_turns_from_an_existing_model(tmp_path, capsys):
    cfg = sft_config(tmp_path, "mix = {add = 1, json = 1}\nval_fraction = 0.2", steps=2, seq_len=256)
    assert main(["train", str(cfg)]) == 0
    assert "chat examples" in capsys.readouterr().err
    rows = [json.loads(ln) for ln in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["val_loss"] > 0
    assert (tmp_path / "sft" / "model" / "tokenizer.json").exists()


def test_sft_replay_mixes_in_pretraining_rows_and_needs_its_source(tmp_path, capsys):
    cfg = sft_config(tmp_path, f'mix = {{chat = 1}}\nreplay = 0.5\nreplay_from = "{tmp_path / "base.toml"}"',
                     steps=1, seq_len=64)
    assert main(["train", str(cfg)]) == 0
    assert "rows of" in capsys.readouterr().err
    # --resume compares what the replayed rows are drawn from, not only replay_from's path
    base = tmp_path / "base.toml"
    base.write_text(base.read_text().replace("fim_rate = 0.5", "fim_rate = 0.25"))
    assert main(["train", str(cfg), "--resume"]) == 2
    assert "[data] replay_from: [data] fim_rate 0.5 (checkpoint) vs 0.25 (now)" in capsys.readouterr().err
    base.write_text(base.read_text().replace("fim_rate = 0.25", "fim_rate = 0.5"))
    assert main(["train", str(cfg), "--resume"]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace(f'replay_from = "{tmp_path / "base.toml"}"', ""))
    assert main(["train", str(bad)]) == 2
    assert "replay_from" in capsys.readouterr().err
    # a fraction of the chat rows that rounds to no row is a note, not a traceback (np.stack of nothing)
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(cfg.read_text().replace("replay = 0.5", "replay = 0.0001").replace(str(tmp_path / "sft"),
                                                                                      str(tmp_path / "sft2")))
    assert main(["train", str(tiny)]) == 0
    assert "nothing mixed in" in capsys.readouterr().err


def test_train_device_is_checked_and_auto_picks_the_cpu_here(tmp_path, capsys):
    import torch

    from dsv4.config import ConfigError
    from dsv4.train.run import train_device

    assert train_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not a device"):
        train_device("gpu0")
    if not torch.cuda.is_available():
        assert train_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            train_device("cuda:0")
        cfg = write_config(tmp_path, "dev")
        cfg.write_text(cfg.read_text().replace("[train]", '[train]\ndevice = "cuda"'))
        assert main(["train", str(cfg)]) == 2 and "no CUDA GPU" in capsys.readouterr().err


def test_bad_train_values_are_clear_errors_before_training(tmp_path, capsys, monkeypatch):
    """A wrong value in [train], [data] or the [model] preset names its field (rc 2) instead of a traceback
    or a run that does nothing; a corpus shorter than one row is refused (the trainer would wrap it around
    inside every row). So are an unknown section or field (misspelt, it would be ignored), a missing path and
    a corpus file that is not UTF-8 text; a failed run leaves no tokenizer behind for the next to reuse."""
    base = write_config(tmp_path, "checks").read_text()
    files = next(ln for ln in base.splitlines() if ln.startswith("files"))
    out = next(ln for ln in base.splitlines() if ln.startswith("out"))
    binary = tmp_path / "binary.py"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    cases = [("steps = 6", "steps = 0", "steps"), ("batch_size = 2", 'batch_size = "two"', "batch_size"),
             ("warmup = 1", "warmup = -1", "warmup"), ("warmup = 1", "warmup = 1\ndecay_frac = 1.5", "decay_frac"),
             ("checkpoint_every = 2", "checkpoint_every = 0", "checkpoint_every"),
             ("seq_len = 32", "seq_len = 100000", "fewer than one row"),
             ("vocab_size = 400", 'vocab_size = "big"', "vocab_size"), ("vocab_size = 400", "vocab_size = 3", "277"),
             ("fim_rate = 0.5", "fim_rate = 2.0", "fim_rate"),
             ("val_fraction = 0.1", "val_fraction = 1", "val_fraction"),
             ('preset = "tiny"', 'preset = "huge"', "preset"),
             ("[model]", "[modle]", "[modle]"), ("[train]", "[extra]\n[train]", "[extra]"),
             ("files =", "file =", "unknown field file"), ("warmup = 1", "warmup = 1\nwarm_up = 2", "warm_up"),
             ('preset = "tiny"', 'preset = "tiny"\nhiden_size = 64', "hiden_size"),
             ('preset = "tiny"', 'preset = "tiny"\nvocab_size = 500', "[data] vocab_size"),
             (files, "files = []", "empty list"), (files, "files = 5", "[data] files"),
             (files, f'files = ["{binary}"]', "binary.py is not UTF-8"),
             ("vocab_size = 400", 'tokenizer = "nope.json"', "nope.json"),
             ("vocab_size = 400", 'vocab_size = 400\ntokenizer = "nope.json"', "read only when a tokenizer is trained"),
             ("vocab_size = 400", 'tokenizer_files = 2\ntokenizer = "nope.json"', "[data] tokenizer_files"),
             ("fim_rate = 0.5", 'replay = "lots"', "replay"), ("fim_rate = 0.5", "replay = -0.5", "replay"),
             (out, f'out = "{tmp_path / "checks.toml"}"', "[train] out")]
    for old, new, named in cases:
        cfg = tmp_path / "bad.toml"
        cfg.write_text(base.replace(old, new))
        assert main(["train", str(cfg)]) == 2, new
        assert named in capsys.readouterr().err
    assert not (tmp_path / "checks" / "tokenizer.json").exists()  # "fewer than one row" trained one, saved none
    cfg.write_bytes(binary.read_bytes())
    assert main(["train", str(cfg)]) == 2 and "not a TOML file" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: a batch of 3 rows does not split over 2 processes
    cfg.write_text(base.replace("batch_size = 2", "batch_size = 3"))
    assert main(["train", str(cfg)]) == 2 and "multiple of the 2 processes" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(dsv4.ConfigError, match="lr_muon"):
        TrainConfig(lr_muon=-1.0)


def test_data_files_take_one_glob_and_exclude_relative_to_its_root(tmp_path):
    from dsv4.train.run import _files

    for name in ("keep.py", "test_a.py", "sub/test_b.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    found = _files(f"{tmp_path}/**/*.py", "test*")  # a lone string is one pattern, not one per character
    assert found == [str(tmp_path / "keep.py"), str(tmp_path / "sub" / "test_b.py")]
    assert _files([f"{tmp_path}/**/*.py"], ["test*", "*/test*"]) == [str(tmp_path / "keep.py")]


def test_a_fresh_run_trains_its_own_tokenizer_and_resume_survives_damaged_metrics(tmp_path, capsys):
    """--resume reuses the run's tokenizer only with the vocab_size it was trained with; without --resume a new
    one is trained. A deleted metrics.jsonl is started again; with no validation rows there is no val_loss
    (never a bare NaN, which is not JSON)."""
    cfg = write_config(tmp_path, "fresh")
    cfg.write_text(cfg.read_text().replace("val_fraction = 0.1", "val_fraction = 0")
                   .replace("checkpoint_every = 2", "checkpoint_every = 1"))
    assert main(["train", str(cfg), "--resume", "--stop-after", "1"]) == 0
    assert "no checkpoint" in capsys.readouterr().err
    metrics = tmp_path / "fresh" / "metrics.jsonl"
    assert "NaN" not in metrics.read_text() and "val_loss" not in metrics.read_text()
    metrics.unlink()
    assert main(["train", str(cfg), "--resume", "--stop-after", "1"]) == 0
    assert [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()] == [2]
    cfg.write_text(cfg.read_text().replace("vocab_size = 400", "vocab_size = 300"))
    assert main(["train", str(cfg), "--resume"]) == 2 and "vocab_size" in capsys.readouterr().err
    # without --resume, a run directory holding a checkpoint is refused, not overwritten at the first save
    assert main(["train", str(cfg), "--stop-after", "1"]) == 2 and "--resume" in capsys.readouterr().err
    assert (tmp_path / "fresh" / "checkpoint").exists()
    shutil.rmtree(tmp_path / "fresh" / "checkpoint")
    shutil.rmtree(tmp_path / "fresh" / "checkpoint.old", ignore_errors=True)
    assert main(["train", str(cfg), "--stop-after", "1"]) == 0
    assert load_tokenizer(tmp_path / "fresh").get_vocab_size() == 300
    # with a given tokenizer, a file that is not UTF-8 is refused by name too (not read as replacement characters)
    (tmp_path / "binary.py").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    files = next(ln for ln in cfg.read_text().splitlines() if ln.startswith("files"))
    cfg.write_text(cfg.read_text().replace(files, f'files = ["{tmp_path / "binary.py"}"]').replace(
        "vocab_size = 300", f'tokenizer = "{tmp_path / "fresh" / "tokenizer.json"}"'))
    assert main(["train", str(cfg)]) == 2 and "binary.py is not UTF-8" in capsys.readouterr().err


def test_corpus_text_spelling_a_special_token_stays_text(tmp_path):
    """A file that spells `<｜end▁of▁sentence｜>` (dsv4's own sft.py does) trains on those characters,
    not on a mid-document EOS; FIM's markers are still the special tokens."""
    import random

    from dsv4.cli import BUNDLED
    from dsv4.tokenizer import FIM_TOKENS
    from dsv4.train.data import build_corpus, fim_transform

    tok = load_tokenizer(BUNDLED)
    eos, special = tok.token_to_id("<｜end▁of▁sentence｜>"), set(tok.get_added_tokens_decoder())
    text = 'END = "<｜end▁of▁sentence｜>"  # also <｜fim▁hole｜>\n' * 3
    path = tmp_path / "special.py"
    path.write_text(text)
    for fim_rate in (0.0, 1.0):
        ids = build_corpus([path], tok, eos, fim_rate=fim_rate).tolist()
        assert ids[-1] == eos and eos not in ids[:-1]
        marks = [tok.id_to_token(i) for i in ids[:-1] if i in special]
        assert marks == ([] if fim_rate == 0 else FIM_TOKENS)
        rng = random.Random(0)
        rng.random()  # build_corpus's draw of whether to transform
        pieces = fim_transform(text, rng)[1::2] if fim_rate else [text]
        assert tok.decode([i for i in ids if i not in special]) == "".join(pieces)
    assert tok.encode_special_tokens is False  # the caller's tokenizer is left as it was


def test_values_that_crashed_or_were_ignored_are_clear_errors_before_any_work(tmp_path, capsys):
    """Each names its field (rc 2, no traceback) before a tokenizer is trained or anything is written: a seed
    NumPy cannot take, tensorboard as a string (bool("false") is true), a device training does not run on,
    [data] fields the corpus kind never reads, [model] init with a preset, --stop-after below 1, a tokenizer
    without the special tokens training writes."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    base = write_config(tmp_path, "mistakes").read_text()
    plain = Tokenizer(models.BPE())  # a tokenizer without V4's special tokens
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.train([str(STDLIB / "abc.py")], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    plain.save(str(tmp_path / "plain.json"))
    init_and_preset = f'[model]\ninit = "{tmp_path}"\npreset = "tiny"\n[train]\nout = "{tmp_path / "mistakes"}"\n'
    cases = [(base.replace("warmup = 1", f"warmup = 1\nseed = {2 ** 32}"), "[train] seed"),
             (base.replace("warmup = 1", 'warmup = 1\ntensorboard = "false"'), "tensorboard: must be true or false"),
             (base.replace("warmup = 1", 'warmup = 1\ndevice = "mps"'), "[train] device: 'mps'"),
             (base.replace("warmup = 1", 'warmup = 1\ndevice = "meta"'), "[train] device: 'meta'"),
             (base.replace("fim_rate = 0.5", "fim_rate = 0.5\nexamples = 10"), "[data] examples"),
             (base.replace("fim_rate = 0.5", "fim_rate = 0.5\nmix = {add = 1}"), "[data] mix"),
             (base.replace("fim_rate = 0.5", "fim_rate = 0.5\nreplay = 0.5"), "[data] replay"),
             (base.replace("fim_rate = 0.5", 'fim_rate = 0.5\nkind = "chat"'), "[data] fim_rate"),
             (base.replace('preset = "tiny"', 'preset = "tiny"\neos_token_id = 3'), "[model] eos_token_id"),
             (init_and_preset, "[model] preset"),
             (f'[model]\ninit = "{tmp_path}"\n[data]\nkind = "chat"\nvocab_size = 400\n'
              f'[train]\nout = "{tmp_path / "mistakes"}"\n',
              "[data] vocab_size: read only when a tokenizer is trained, and [model] init gives one"),
             (base.replace("vocab_size = 400", f'tokenizer = "{tmp_path / "plain.json"}"'), "[data] tokenizer")]
    cfg = tmp_path / "bad.toml"
    for text, named in cases:
        cfg.write_text(text)
        assert main(["train", str(cfg)]) == 2, text
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, err
        assert not (tmp_path / "mistakes" / "tokenizer.json").exists() and not list(tmp_path.glob("**/metrics.jsonl"))
    assert "<｜begin▁of▁sentence｜>" in err  # the missing token is named
    shutil.rmtree(tmp_path / "mistakes", ignore_errors=True)  # the tokenizer case made the (empty) run directory
    cfg.write_text(base)
    for n in ("0", "-1"):
        assert main(["train", str(cfg), "--stop-after", n]) == 2 and "--stop-after" in capsys.readouterr().err
    assert not (tmp_path / "mistakes").exists()


def test_chat_data_and_replay_source_mistakes_name_their_field(tmp_path, capsys):
    """An SFT seq_len no example fits, and bad values inside the replay_from config (named with that file),
    are clear errors; the replay source is checked before the init model is even looked at."""
    cfg = sft_config(tmp_path, "mix = {add = 1}", steps=1, seq_len=16)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "[train] seq_len" in err and "no example fits" in err and "Traceback" not in err
    src = tmp_path / "src.toml"
    base = (tmp_path / "base.toml").read_text()
    for old, new, named in (("seq_len = 32", 'seq_len = "long"', "[train] seq_len"),
                            ("fim_rate = 0.5", 'fim_rate = "half"', "[data] fim_rate"),
                            ("[train]", "[trian]\n[train]", "[trian]"),
                            ("fim_rate = 0.5", 'kind = "chat"', "[data] kind")):
        src.write_text(base.replace(old, new))
        sft = tmp_path / "sft_replay.toml"
        sft.write_text(cfg.read_text().replace("seq_len = 16", "seq_len = 256").replace(
            "[data]", f'[data]\nreplay = 0.5\nreplay_from = "{src}"').replace(str(tmp_path / "base" / "model"), "nope"))
        assert main(["train", str(sft)]) == 2, new
        err = capsys.readouterr().err
        assert f"[data] replay_from: {src}" in err and named in err and "Traceback" not in err, err


def test_a_tokenizer_s_bos_and_eos_ids_go_into_the_model_config(tmp_path, capsys):
    """A [data] tokenizer whose BOS / EOS are not ids 0 / 1: the saved config carries its ids (the engine stops at
    config.eos_token_id, which must be the EOS the model learnt), qat (whose official layout fixes 0 / 1) is refused,
    and so is an init model whose ids differ from the tokenizer's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dsv4.engine import EngineConfig, LLMEngine
    from dsv4.tokenizer import special_tokens

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(STDLIB / f) for f in ("abc.py", "bisect.py", "colorsys.py")], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<unk>", *special_tokens()], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "shifted.json"))
    bos, eos = tok.token_to_id("<｜begin▁of▁sentence｜>"), tok.token_to_id("<｜end▁of▁sentence｜>")
    assert (bos, eos) == (2, 3)
    cfg = write_config(tmp_path, "shifted")
    text = cfg.read_text().replace("vocab_size = 400", f'tokenizer = "{tmp_path / "shifted.json"}"')
    cfg.write_text(text.replace("steps = 6", "steps = 2"))
    assert main(["train", str(cfg)]) == 0
    model = dsv4.load_model(tmp_path / "shifted" / "model")
    assert (model.config.bos_token_id, model.config.eos_token_id) == (2, 3)
    engine = LLMEngine(model, load_tokenizer(tmp_path / "shifted" / "model"), EngineConfig())
    assert engine.eos == eos
    cfg.write_text(text.replace("warmup = 1", 'warmup = 1\nqat = "fp4"').replace(f'out = "{tmp_path / "shifted"}"',
                                                                                   f'out = "{tmp_path / "qat"}"'))
    assert main(["train", str(cfg)]) == 2 and "[train] qat" in capsys.readouterr().err
    assert main(["train", str(write_config(tmp_path, "plain"))]) == 0  # ids 0 / 1
    sft = tmp_path / "sft.toml"
    sft.write_text(f'[model]\ninit = "{tmp_path / "plain" / "model"}"\n[data]\nkind = "chat"\nexamples = 5\n'
                   f'tokenizer = "{tmp_path / "shifted.json"}"\n[train]\nsteps = 1\nbatch_size = 1\nseq_len = 512\n'
                   f'out = "{tmp_path / "sft"}"\n')
    assert main(["train", str(sft)]) == 2
    err = capsys.readouterr().err
    assert "[data] tokenizer" in err and "(2, 3)" in err and "(0, 1)" in err


def test_tokenizer_settings_survive_a_kill_mid_write_and_a_damaged_file_is_named(tmp_path, capsys, monkeypatch):
    """tokenizer-settings.json is written atomically: a kill while writing it leaves a run that --resume continues
    (it used to leave a partial file, and --resume a JSONDecodeError traceback). One damaged some other way is a
    clear error naming the file."""
    cfg = write_config(tmp_path, "killed")
    real = Path.write_text

    class Killed(BaseException):
        pass

    def dying(self, data, *a, **k):
        if self.name.startswith("tokenizer-settings.json"):
            real(self, data[:len(data) // 2], *a, **k)
            raise Killed
        return real(self, data, *a, **k)

    monkeypatch.setattr(Path, "write_text", dying)
    with pytest.raises(Killed):
        main(["train", str(cfg)])
    monkeypatch.undo()
    assert main(["train", str(cfg), "--resume", "--stop-after", "2"]) == 0
    settings = tmp_path / "killed" / "tokenizer-settings.json"
    assert json.loads(settings.read_text()) == {"vocab_size": 400}
    settings.write_text('{"vocab')
    assert main(["train", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer-settings.json" in err and "Traceback" not in err


def test_resume_refuses_changed_settings_and_extends_steps_only_before_the_decay(tmp_path, capsys):
    """--resume continues a run with its own settings: an edited [train] or [data] value (or qat) is an error naming
    each with its checkpoint and current value (weight_decay used to be dropped while the checkpoint recorded it,
    seq_len to re-slice the stream). device and compile may change, and steps while no step taken has decayed:
    the resumed run is then a longer run, row for row; once the decay has begun, a longer run is refused."""
    cfg = write_config(tmp_path, "edit")
    text = cfg.read_text()
    assert main(["train", str(cfg), "--stop-after", "3"]) == 0  # checkpoint at step 2
    assert_resume_refused(cfg, text, (("seq_len = 32", "seq_len = 48\nweight_decay = 0.5",
                                       ["[train] seq_len 32 (checkpoint) vs 48 (now)",
                                        "[train] weight_decay 0.1 (checkpoint) vs 0.5 (now)"]),
                                      ("fim_rate = 0.5", "fim_rate = 0.25",
                                       ["[data] fim_rate 0.5 (checkpoint) vs 0.25 (now)"]),
                                      ("warmup = 1", 'warmup = 1\nqat = "fp4"',
                                       ["[train] qat None (checkpoint) vs 'fp4' (now)"])), capsys)
    cfg.write_text(text.replace("steps = 6", "steps = 12").replace("warmup = 1", 'warmup = 1\ndevice = "cpu"'))
    assert main(["train", str(cfg), "--resume"]) == 0
    longer = write_config(tmp_path, "longer")
    longer.write_text(longer.read_text().replace("steps = 6", "steps = 12"))
    assert main(["train", str(longer)]) == 0
    assert (tmp_path / "edit" / "metrics.jsonl").read_text() == (tmp_path / "longer" / "metrics.jsonl").read_text()
    meta = json.loads((tmp_path / "edit" / "checkpoint" / "trainer.json").read_text())
    assert meta["step"] == 12 and meta["config"]["steps"] == 12
    cfg.write_text(text.replace("steps = 6", "steps = 20"))  # after 12 steps that decayed over 10 and 11
    assert main(["train", str(cfg), "--resume"]) == 2
    assert "[train] steps 12 (checkpoint) vs 20 (now)" in capsys.readouterr().err


def test_the_last_step_is_checkpointed_and_validated_when_steps_is_no_multiple_of_checkpoint_every(tmp_path):
    """steps = 5 with checkpoint_every = 2: checkpoints at steps 2 and 4, and at the last step 5 too (a finished run
    can be resumed or extended from where it ended), each with a val_loss in its metrics row."""
    cfg = write_config(tmp_path, "odd")
    cfg.write_text(cfg.read_text().replace("steps = 6", "steps = 5"))
    assert main(["train", str(cfg)]) == 0
    rows = [json.loads(ln) for ln in (tmp_path / "odd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4, 5]
    meta = json.loads((tmp_path / "odd" / "checkpoint" / "trainer.json").read_text())
    assert meta["step"] == 5


def test_replayed_rows_come_from_the_training_part_of_the_pretraining_corpus(tmp_path):
    """SFT replay draws rows of replay_from's corpus from its training part only: never a row that reaches into
    the last val_fraction of that corpus (its validation rows, which the pretraining run never trained on)."""
    import io

    import numpy as np

    from dsv4.cli import BUNDLED
    from dsv4.train.run import _replay_source, _with_replay, text_corpus

    base = write_config(tmp_path, "base")
    base.write_text(base.read_text().replace("val_fraction = 0.1", "val_fraction = 0.5"))
    data = {"replay": 4.0, "replay_from": str(base)}
    source = _replay_source(data)
    tok = load_tokenizer(BUNDLED)
    pdata, ptcfg = source
    text = text_corpus(pdata, tok, ptcfg.seed)
    width = 33  # the base's seq_len 32 + 1; the SFT run's seq_len is the same here
    cut = len(text) - int(len(text) // width * 0.5) * width  # the last half of the whole rows is validation
    assert 0 < cut < len(text) - width
    rows = 10
    chat = np.full(rows * width, -1, dtype=np.int32)  # no corpus token is -1: the chat rows are recognisable
    tokens, mask = _with_replay(chat, np.zeros(rows * width, dtype=np.uint8), data, source, tok,
                                TrainConfig(batch_size=2, seq_len=32), io.StringIO())
    tokens, mask = tokens.reshape(-1, width), mask.reshape(-1, width)
    replayed = tokens[mask.all(1)]
    assert len(replayed) == 40 and len(tokens) == 50 and (tokens[~mask.all(1)] == -1).all()
    windows = np.lib.stride_tricks.sliding_window_view(text, width)
    train_windows = {w.tobytes() for w in windows[: cut - width + 1]}  # rows lying wholly within text[:cut]
    outside = [r for r in replayed if r.astype(text.dtype).tobytes() not in train_windows]
    assert not outside, f"{len(outside)} of {len(replayed)} replayed rows are not rows of the training part"
