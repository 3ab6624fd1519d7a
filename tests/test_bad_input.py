"""Every bad input is one clear line (issue 17): a broken file named (and its row), a chat template's error or
runaway stopped within a bound, decoding past the model's context refused, flags out of range refused before the
model loads, convert_gguf.py never destroying a directory it did not write, and a Ctrl-C one line with exit 130.

Most cases call a script's main through errors.run in-process (what `python script.py` does); a few run the real
scripts as subprocesses: their entry points, and the signals."""
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import compare
import convert_gguf
import data
import errors
import eval as ev
import sample
import chat_template
import tokenizer
from conftest import ROOT, write_jsonl
from errors import UserError
from model import ModelConfig, Transformer
from tokenizer import Tokenizer

ROWS = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                      {"role": "assistant", "content": f"#### {i + 1}"}], "answer": str(i + 1)} for i in range(3)]


# ---------------------------------------------------------------------------------------------------------------
# helpers


def run_main(main, argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of main(argv) under errors.run, as `python script.py argv` runs it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        errors.run(main, argv)
    return e.value.code, capsys.readouterr().err


def assert_one_line(code, err, *names, exit_code=1):
    """A refusal: the exit code, no traceback, and exactly one 'error:' line that names each of names."""
    assert code == exit_code and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail if a model's weights are loaded: flag and context checks come first."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(Transformer, "from_pretrained", classmethod(refuse))


@pytest.fixture
def ckpt(tmp_path, tiny_tied_dir):
    """A writable copy of the tiny checkpoint (SmolLM2's tokenizer, 2 layers of width 32, context 64)."""
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_tied_dir, out)
    edit_json(out / "config.json", max_position_embeddings=64)
    return out


def edit_json(path, **changes):
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# class 6: every load error names the file


def _truncated(b):
    return b[: len(b) // 2]


def _huge_header(b):
    return struct.pack("<Q", 1 << 40) + b[8:]


def _garbage_header(b):
    return struct.pack("<Q", 12) + b"{not json!!}" + b[20:]


@pytest.mark.parametrize("corrupt", [_truncated, _huge_header, _garbage_header])
def test_broken_safetensors_is_one_line_naming_the_file(ckpt, capsys, corrupt):
    st = ckpt / "model.safetensors"
    st.write_bytes(corrupt(st.read_bytes()))
    code, err = run_main(sample.main, ["--init", str(ckpt), "--max_new_tokens", "2"], capsys)
    assert_one_line(code, err, st, "safetensors")


@pytest.mark.parametrize("file, change, says", [
    ("config.json", "{oops", "not valid JSON"),
    ("config.json", "[1, 2]", "top level must be an object"),
    ("config.json", dict(vocab_size=-5), "vocab_size=-5 must be a positive integer"),
    ("config.json", dict(hidden_size="32"), "hidden_size='32' must be a positive integer"),
    ("config.json", dict(rope_scaling=[1, 2]), "rope_scaling=[1, 2] must be an object"),
    ("config.json", dict(rms_norm_eps=float("nan")), "rms_norm_eps=nan"),
    # absurd sizes stop before anything is built or allocated (a billion layers, a trillion-row table)
    ("config.json", dict(num_hidden_layers=10**9), "the weights hold 2 layers"),
    ("config.json", dict(vocab_size=10**12), "embed_tokens.weight has shape (49152, 32)"),
    ("tokenizer.json", "{oops", "not valid JSON"),
    ("tokenizer.json", dict(model="BPE"), "not a tokenizer file of the expected shape"),
    ("tokenizer.json", dict(added_tokens={"a": 1}), "not a tokenizer file of the expected shape"),
    ("tokenizer_config.json", "\xff", "not valid JSON"),
    ("tokenizer_config.json", dict(chat_template=5), "chat_template must be a string"),
    ("tokenizer_config.json", dict(added_tokens_decoder=[1]), "added_tokens_decoder must be an object"),
    ("tokenizer_config.json", dict(eos_token=["x"]), "eos_token=['x'] must be a token"),
    ("generation_config.json", dict(eos_token_id="2"), "eos_token_id='2' must be a token id"),
])
def test_broken_json_file_is_one_line_naming_it(ckpt, capsys, file, change, says):
    path = ckpt / file
    if isinstance(change, dict):
        edit_json(path, **change)
    else:
        path.write_text(change)
    t0 = time.time()
    code, err = run_main(sample.main, ["--init", str(ckpt), "--max_new_tokens", "2"], capsys)
    assert_one_line(code, err, path, says)
    assert time.time() - t0 < 20  # nothing absurd was built


def test_corrupt_sentencepiece_model_is_named(ckpt, capsys):
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.model").write_bytes(b"\x0a\x05hello this is not a sentencepiece model")
    code, err = run_main(sample.main, ["--init", str(ckpt), "--max_new_tokens", "2"], capsys)
    assert_one_line(code, err, ckpt / "tokenizer.model", "not a sentencepiece model")


def test_data_errors_name_file_and_line(tmp_path, ckpt, capsys):
    bad = tmp_path / "rows.jsonl"
    lines = [json.dumps(r).encode() for r in ROWS]
    bad.write_bytes(lines[0] + b"\n" + lines[1] + b"\n" + lines[2].replace(b"What", b"Wh\xe9t") + b"\n")
    with pytest.raises(UserError, match=re.escape(f"{bad}:3: not UTF-8")):  # train.py's reader
        data.read_rows(str(bad))
    code, err = run_main(ev.main, ["--init", str(ckpt), "--data", str(bad)], capsys)
    assert_one_line(code, err, f"{bad}:3", "not UTF-8")
    # a directory, and a parquet file that is not one
    with pytest.raises(UserError, match=re.escape(f"{tmp_path}: is a directory")):
        data.read_rows(str(tmp_path))
    code, err = run_main(ev.main, ["--init", str(ckpt), "--data", str(tmp_path)], capsys)
    assert_one_line(code, err, tmp_path, "is a directory")
    parquet = tmp_path / "rows.parquet"
    parquet.write_bytes(b"PAR1 this is no parquet file PAR1")
    with pytest.raises(UserError, match=re.escape(f"{parquet}: not a readable parquet file")):
        data.read_rows(str(parquet))
    assert capsys.readouterr().err == ""  # and nothing else was printed
    # JSON lines are split at "\n" only: a raw U+2028 inside a string is not a line break
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"prompt": "a\u2028b", "response": "c"}, ensure_ascii=False) + "\n")
    assert data.read_rows(str(odd))[0]["prompt"] == "a\u2028b"


def test_bad_gguf_is_one_line_naming_it(tmp_path, capsys):
    good = open(convert_gguf.default_gguf(), "rb").read(1 << 16)
    cases = {"truncated.gguf": good[:1000], "garbage.gguf": b"hello, world" * 100, "empty.gguf": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    for path, says in [*[(tmp_path / n, "not a readable GGUF file") for n in cases],
                       (tmp_path, "is a directory"), (tmp_path / "missing.gguf", "no such file")]:
        code, err = run_main(convert_gguf.main, ["--gguf", str(path), "--out", str(tmp_path / "out")], capsys)
        assert_one_line(code, err, path, says)
        assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_scripts_entry_points_report_one_line(tmp_path):
    """The real entry points (`python X.py`) run main under errors.run (sample.py's and eval.py's: see the Ctrl-C
    test below)."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not gguf")
    for cmd, name in [(["convert_gguf.py", "--gguf", str(bad), "--out", str(tmp_path / "o")], bad),
                      (["compare.py", "--data", str(tmp_path / "none.jsonl")], tmp_path / "none.jsonl")]:
        r = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert_one_line(r.returncode, r.stderr, name)


# ---------------------------------------------------------------------------------------------------------------
# class 7: chat templates: errors are one line naming the template (and the row); runaways stop within a bound


def _template_dir(tmp_path, ckpt, template):
    (ckpt / "chat_template.jinja").write_text(template)
    return ckpt


ALTERNATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
             "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")


def test_template_error_names_template_and_row(tmp_path, ckpt, capsys):
    _template_dir(tmp_path, ckpt, ALTERNATE)
    rows = ROWS[:1] + [{"messages": [ROWS[1]["messages"][1], ROWS[1]["messages"][0], ROWS[1]["messages"][1]],
                        "answer": "2"}] + ROWS[2:]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    template = ckpt / "chat_template.jinja"
    with pytest.raises(UserError) as e:  # train.py's data path: the row and the template
        data.tokenize_sources(path, str(ckpt), 64, log=lambda *a: None)
    assert str(e.value).startswith(f"{path} row 2: {template}: chat template line 1: raise_exception: Conversation")
    code, err = run_main(ev.main, ["--init", str(ckpt), "--data", path, "--max_new_tokens", "4"], capsys)
    assert_one_line(code, err, f"{path}: row 2", template, "roles must alternate")


@pytest.mark.parametrize("template, says", [
    ("{% for m in messages %}{{ m.content }", "chat template line 1: unexpected"),  # at load: a syntax error
    ("{{ messages.__class__.__mro__ }}", "refused by the sandbox"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion too deep"),
    ("{{ messages[0].content + 1 }}", "TypeError"),
])
def test_template_errors_are_one_line(tmp_path, ckpt, capsys, template, says):
    _template_dir(tmp_path, ckpt, template)
    code, err = run_main(sample.main, ["--init", str(ckpt), "--chat", "--prompt", "hi", "--max_new_tokens", "2"],
                         capsys)
    assert_one_line(code, err, ckpt / "chat_template.jinja", says)


# each runaway and what stops it: the loop count, a size checked before the operation runs (no gigabyte is ever
# allocated), a size checked on a value read back, the output's size, the integer bound, Python's recursion limit
RUNAWAYS = {
    "nested loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "ran more than 4194304 loop iterations"),
    "loops over a list": ("{% set x = range(100000) | list %}{% for a in x %}{% for b in x %}{% endfor %}"
                          "{% endfor %}", "ran more than"),
    "gigabyte string": ("{{ 'x' * 1000000000 }}", "would build a value of 1000000000 items"),
    "gigabyte filter": ("{{ 'x' | center(1000000000) }}", "asked for 1000000000"),
    "gigabyte method": ("{{ 'x'.ljust(1000000000) }}", "asked for 1000000000"),
    "gigabyte format": ("{{ '%1000000000d' % 1 }}", "would build a value of 1000000000"),
    "gigabyte str.format": ("{{ '{:>1000000000}'.format(1) }}", "would build a value of 1000000000"),
    "doubling": ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                 "{{ ns.s }}", "built a value of 8388608 items"),
    "doubling by recursion": ("{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('x') }}", "built a value of"),
    "doubling by loop()": ("{% for x in ['ab'] recursive %}{{ loop([x ~ x]) }}{% endfor %}", "built a value of"),
    "output flood": ("{% for i in range(100000) %}{% for j in range(100000) %}{{ 'x' * 64 }}{% endfor %}"
                     "{% endfor %}", "wrote more than 4194304 characters"),
    "integer blowup": ("{{ 9 ** 999999999 }}", "integer of about"),
    "replace blowup": ("{% set s = 'x' * 100000 %}{{ s.replace('x', s) }}", "would build a value of 10000000000"),
    "join blowup": ("{% set s = 'x' * 100000 %}{{ ([s] * 100000) | join }}", "would build a value of 10000000000"),
    "endless recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion too deep"),
}


@pytest.mark.parametrize("name", list(RUNAWAYS))
def test_runaway_template_stops_within_a_bound(tmp_path, ckpt, name):
    template, says = RUNAWAYS[name]
    path = _template_dir(tmp_path, ckpt, template)
    tok = Tokenizer.from_pretrained(str(path))
    t0 = time.time()
    with pytest.raises(UserError) as e:
        tok.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert time.time() - t0 < 15 and "\n" not in str(e.value)
    assert str(e.value).startswith(f"{path / 'chat_template.jinja'}: chat template") and says in str(e.value)


def test_slow_template_stops_at_the_time_bound(tmp_path, ckpt, monkeypatch):
    monkeypatch.setattr(chat_template, "TEMPLATE_SECONDS", 0.3)
    # seconds of work without the bound (so that the test fails soon), stopped after 0.3 s of CPU with it
    path = _template_dir(tmp_path, ckpt, "{% for i in range(60) %}{{ (range(30000) | map('string') | sort | "
                                         "join) | length }}{% endfor %}")
    t0 = time.time()
    with pytest.raises(UserError, match=r"still running after 0.3 s of CPU time \(chat_template.TEMPLATE_SECONDS\)"):
        Tokenizer.from_pretrained(str(path)).render([{"role": "user", "content": "hi"}])
    assert time.time() - t0 < 15


def test_real_templates_render_as_before(smollm2_dir):
    """The bounds change nothing for real templates: SmolLM2's and the default render every bundled row as an
    unbounded sandbox does (the tokenizer tests compare the ids with transformers')."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    rows = [json.loads(line) for line in open(os.path.join(ROOT, "data", "chain_test.jsonl"))]
    tok = Tokenizer.from_pretrained(smollm2_dir)
    for template in (tok.chat_template, tokenizer.DEFAULT_CHAT_TEMPLATE):
        plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
        ours = Tokenizer(tok._backend, {}, {}, tok.vocab_size, "<s>", "</s>", template, [], [])
        for r in rows:
            for msgs, gen in ((r["messages"], False), (r["messages"][:-1], True)):
                want = plain.render(messages=msgs, add_generation_prompt=gen, bos_token="<s>", eos_token="</s>")
                assert ours.render(msgs, gen) == want


# ---------------------------------------------------------------------------------------------------------------
# class 9: decoding past the model's context is refused, before the model loads


def test_sample_past_the_context_is_refused(ckpt, capsys, no_model_load):
    prompt = "one two three four five six seven eight"  # 8 tokens; the context is 64
    for n, says in [(64, "--max_new_tokens 64 is beyond the context"), (57, "do not fit the context")]:
        code, err = run_main(sample.main, ["--init", str(ckpt), "--prompt", prompt, "--max_new_tokens", str(n)],
                             capsys)
        assert_one_line(code, err, says, "64 positions", exit_code=2)


def test_eval_rows_past_the_context_are_refused(tmp_path, ckpt, capsys, no_model_load):
    long = dict(ROWS[0], messages=[{"role": "user", "content": "word " * 80}, ROWS[0]["messages"][1]])
    path = write_jsonl(tmp_path / "rows.jsonl", [ROWS[0], long])
    code, err = run_main(ev.main, ["--init", str(ckpt), "--data", path, "--max_new_tokens", "4"], capsys)
    assert_one_line(code, err, f"{path}: row 2", "do not fit the context", "64 positions")
    code, err = run_main(ev.main, ["--init", str(ckpt), "--data", path, "--max_new_tokens", "64"], capsys)
    assert_one_line(code, err, "--max_new_tokens 64 is beyond the context", exit_code=2)


def test_generate_past_the_context_is_refused():
    import torch
    model = Transformer(ModelConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=8,
                                    max_position_embeddings=16, model_type="llama"))
    assert model.generate(torch.zeros(1, 10, dtype=torch.long), 6, temperature=0).shape == (1, 16)
    with pytest.raises(UserError, match="context is 16 positions"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), 7, temperature=0)


# ---------------------------------------------------------------------------------------------------------------
# class 5: flags out of range are one argparse line, before the model loads


@pytest.mark.parametrize("flags, says", [
    (["--max_new_tokens", "-1"], "--max_new_tokens -1: must be >= 0"),
    (["--top_k", "0"], "--top_k 0: must be >= 1"),
    (["--top_p", "0"], "--top_p 0.0: must be in (0, 1]"),
    (["--top_p", "1.5"], "--top_p 1.5: must be in (0, 1]"),
    (["--top_p", "nan"], "--top_p nan"),
    (["--temperature", "-0.5"], "--temperature -0.5: must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature nan"),
    (["--prompt", ""], "--prompt: empty"),
])
def test_sample_flags_out_of_range(ckpt, capsys, no_model_load, flags, says):
    code, err = run_main(sample.main, ["--init", str(ckpt), *flags], capsys)
    assert_one_line(code, err, says, exit_code=2)


@pytest.mark.parametrize("flags, says", [
    (["--max_new_tokens", "-1"], "--max_new_tokens -1: must be >= 0"),
    (["--batch_size", "0"], "--batch_size 0: must be >= 1"),
    (["--limit", "-2"], "--limit -2: must be >= 0"),
    (["--out", "no/such/folder/r.json"], "--out no/such/folder/r.json: the folder no/such/folder does not exist"),
    (["--data", "", "--gsm8k", ""], "nothing to evaluate"),
])
def test_eval_flags_out_of_range(ckpt, capsys, no_model_load, flags, says):
    code, err = run_main(ev.main, ["--init", str(ckpt), *flags], capsys)
    assert_one_line(code, err, says, exit_code=2)


def test_eval_device_and_compare_flags_out_of_range(ckpt, capsys, no_model_load):
    code, err = run_main(ev.main, ["--init", str(ckpt), "--device", "tpu"], capsys)
    assert_one_line(code, err, "--device tpu: not a device")
    for flags, says in [(["--eval_batch_size", "0"], "--eval_batch_size 0: must be >= 1"),
                        (["--max_new_tokens", "-3"], "--max_new_tokens -3: must be >= 0"),
                        (["--steps", "0", "--eval_at", "0"], "--steps 0: must be >= 1"),
                        (["--steps", "10", "--eval_at", "0", "10"], "--eval_at 0 10: every step must be in"),
                        (["--limit", "-1"], "--limit -1: must be >= 0")]:
        code, err = run_main(compare.main, flags, capsys)
        assert_one_line(code, err, says, exit_code=2)


@pytest.mark.parametrize("script", [sample, ev, compare, convert_gguf])
def test_help_gives_every_flag_its_meaning_and_default(script, capsys):
    with pytest.raises(SystemExit):
        (script.parse_args if script is compare else script.main)(["--help"])
    text = capsys.readouterr().out
    blocks = re.split(r"\n  (?=-)", text.split("options:")[1])[1:]
    assert len(blocks) >= 2
    for block in blocks:
        if block.startswith("-h"):
            continue
        head, _, meaning = block.partition("  ")
        assert meaning.strip() and ("(default:" in block or "(required)" in block), block
        assert "(default: None)" not in block or "None:" in block, block  # None means what the help says
    if script is compare:
        assert "sft ift dpo orpo simpo tdpo" in text


# ---------------------------------------------------------------------------------------------------------------
# class 1: convert_gguf.py never destroys what it did not write


def tiny_gguf(path, n_vocab=8) -> str:
    """A llama GGUF small enough to convert in a moment (2 layers, width 8; byte-level BPE tokens a..h)."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(32)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([chr(ord("a") + i) for i in range(n_vocab)])
    w.add_token_types([1] * n_vocab)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    g = np.random.default_rng(0)
    shapes = {"token_embd.weight": (n_vocab, 8), "output_norm.weight": (8,)}
    for i in range(2):
        shapes.update({f"blk.{i}.attn_norm.weight": (8,), f"blk.{i}.ffn_norm.weight": (8,),
                       f"blk.{i}.attn_q.weight": (8, 8), f"blk.{i}.attn_k.weight": (4, 8),
                       f"blk.{i}.attn_v.weight": (4, 8), f"blk.{i}.attn_output.weight": (8, 8),
                       f"blk.{i}.ffn_gate.weight": (16, 8), f"blk.{i}.ffn_up.weight": (16, 8),
                       f"blk.{i}.ffn_down.weight": (8, 16)})
    for name, shape in shapes.items():
        w.add_tensor(name, g.standard_normal(shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_convert_refuses_a_directory_it_did_not_write(tmp_path, capsys):
    src = tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "own work"}')
    (out / "notes.txt").write_text("do not lose me")
    before = {p.name: sha256(p) for p in out.iterdir()}
    code, err = run_main(convert_gguf.main, ["--gguf", src, "--out", str(out)], capsys)
    assert_one_line(code, err, out, "not empty and is not an earlier output")
    assert {p.name: sha256(p) for p in out.iterdir()} == before
    (tmp_path / "a_file").write_text("x")
    code, err = run_main(convert_gguf.main, ["--gguf", src, "--out", str(tmp_path / "a_file")], capsys)
    assert_one_line(code, err, tmp_path / "a_file", "is a file")


def test_convert_rewrites_only_its_own_files_in_its_own_output(tmp_path, capsys):
    src = tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "conv"
    sibling = tmp_path / "conv.tmp"  # the old converter removed this name wholesale
    sibling.mkdir()
    (sibling / "keep.txt").write_text("mine")
    errors.run(convert_gguf.main, ["--gguf", src, "--out", str(out)])
    assert sorted(os.listdir(out)) == sorted(convert_gguf.OWNED)
    stamp = json.loads((out / "conversion.json").read_text())
    assert stamp == convert_gguf.stamp(src) and stamp["converter"] == "convert_gguf.py"
    model = Transformer.from_pretrained(str(out))  # a loadable checkpoint
    assert model.config.n_layers == 2 and model.config.max_position_embeddings == 32
    (out / "notes.txt").write_text("my notes")
    (out / "config.json").write_text("{}")  # damaged: the next conversion writes it again
    convert_gguf.convert(src, str(out))
    assert (out / "notes.txt").read_text() == "my notes" and (sibling / "keep.txt").read_text() == "mine"
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_a_stopped_conversion_is_made_again(tmp_path, monkeypatch):
    """Stopped while writing: the marker written first says 'ours, not complete' (stale for ensure_default), and
    the next call converts into the directory again."""
    src = tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "conv"
    write_file = convert_gguf.write_file

    def stop_at_config(out_dir, name, write):
        if name == "config.json":
            raise KeyboardInterrupt
        write_file(out_dir, name, write)
    monkeypatch.setattr(convert_gguf, "write_file", stop_at_config)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf.convert(src, str(out))
    monkeypatch.undo()
    assert json.loads((out / "conversion.json").read_text()) == {"converter": "convert_gguf.py", "complete": False}
    assert sorted(os.listdir(out)) == ["conversion.json", "model.safetensors"]  # no temporary file left
    convert_gguf.convert(src, str(out))
    assert json.loads((out / "conversion.json").read_text()) == convert_gguf.stamp(src)


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C: one line, exit 130; compare.py's train.py child gets the signal and finishes


def _wait_for(proc, text: str, timeout=120):
    """Read proc's stdout until text has appeared (a streamed continuation has no newline to wait for)."""
    seen, t0 = b"", time.time()
    while text.encode() not in seen:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk or time.time() - t0 > timeout:
            raise AssertionError(f"never printed {text!r}: {proc.stderr.read()}")
        seen += chunk


def sigint_default():
    """For a child this test will Ctrl-C: SIGINT as a terminal gives it. A shell starting a job in the background
    without job control (`bash .ci/run &`) ignores SIGINT, and children inherit that, so Python would install no
    KeyboardInterrupt handler and the Ctrl-C tests would see nothing stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_sample_and_eval_is_one_line(tmp_path, tiny_tied_dir):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS * 30)
    for cmd, started in [(["sample.py", "--init", tiny_tied_dir, "--prompt", "Once", "--max_new_tokens", "30000",
                           "--temperature", "0"], "Once"),
                         (["eval.py", "--init", tiny_tied_dir, "--data", path, "--batch_size", "1"], "rows)")]:
        proc = subprocess.Popen([sys.executable, "-u", *cmd], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=sigint_default)
        try:
            _wait_for(proc, started)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            err = proc.communicate(timeout=60)[1].decode()
        finally:
            proc.kill()
        assert proc.returncode == 130 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == "interrupted", err


FAKE_TRAIN = """
import signal, sys, time
def stop(signum, frame):
    time.sleep(0.5)  # finishing a checkpoint
    open(sys.argv[-1], "w").write("stopped by SIGINT")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
open(sys.argv[-1], "w").write("started")
time.sleep(30)
"""


def test_ctrl_c_in_compare_reaches_train_and_is_one_line(tmp_path):
    """A Ctrl-C (here sent to compare.py alone) is passed on to the train.py it runs, which finishes its checkpoint
    and stops: never killed; compare.py then stops with one line."""
    (tmp_path / "train.py").write_text(FAKE_TRAIN)
    marker = tmp_path / "marker"
    code = (f"import compare, errors; compare.HERE = {str(tmp_path)!r}; "
            f"errors.run(lambda argv: compare.run_child([compare.sys.executable, compare.os.path.join("
            f"compare.HERE, 'train.py'), {str(marker)!r}], 'train.py --method sft --seed 1', 'runs', grace_s=0.5))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=sigint_default)
    try:
        t0 = time.time()
        while not marker.exists() and time.time() - t0 < 120:
            time.sleep(0.1)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert marker.read_text() == "stopped by SIGINT"
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["interrupted during train.py --method sft --seed 1 (it stopped with exit "
                                        "code 130); finished stages are kept in runs/results.json: run the same "
                                        "command again to continue"]
