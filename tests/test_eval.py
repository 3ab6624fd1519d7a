"""eval.py and make_data.py: answer extraction, the data files (deterministic, disjoint, arithmetically
right), the held-out loss against a direct computation, exact-match counting, length-grouped generation,
and the command line end to end on a tiny random checkpoint."""
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

import eval as ev
import make_data
from errors import UserError
from model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# answers

@pytest.mark.parametrize("text, want", [
    ("17 + 25 = 42\n42 * 3 = 126\n#### 126", "126"),
    ("#### 1,234.", "1234"),
    ("so the answer is\n####   -7 \nextra 99", "-7"),
    ("#### r q e k", "r q e k"),
    ("#### $18.00", "18"),
    ("#### 12\n#### 13", "12"),                  # the first "####" counts
    ("first 3 then 4, finally 5,000.", "5000"),  # no "####": the last number
    ("it is -12.", "-12"),
    ("3.5 apples", "3.5"),
    ("no digits here", ""),
    ("", ""),
])
def test_extract_answer(text, want):
    assert ev.extract_answer(text) == want


def test_normalize():
    assert ev.normalize(" 1,000,000. ") == "1000000"
    assert ev.normalize("-3") == "-3" and ev.normalize("v c e") == "v c e"
    assert ev.normalize("12,34") == "12,34"  # not a thousands separator: left alone


# -----------------------------------------------------------------------------
# make_data.py

def question(row):
    return row["messages"][0]["content"]


def test_make_data_is_deterministic_and_disjoint():
    cfg = make_data.DataConfig(n_train=300, n_test=50)
    train, test = make_data.make_splits(cfg)
    assert (train, test) == make_data.make_splits(cfg)
    assert len(train) == 300 and len(test) == 50
    assert not {question(r) for r in train} & {question(r) for r in test}
    assert make_data.make_splits(make_data.DataConfig(n_train=300, n_test=50, seed=1))[1] != test


def read(name):
    with open(os.path.join(ROOT, "data", name)) as f:
        return [json.loads(line) for line in f]


def test_shipped_files_are_the_default_output():
    train, test = make_data.make_splits(make_data.DataConfig())
    assert read("chain_train.jsonl") == train and read("chain_test.jsonl") == test
    assert len({question(r) for r in train + test}) == len(train) + len(test)


def check_arith(row):
    q = re.fullmatch(r"Start with (\d+)\. (.+)\. What is the result\?", question(row))
    x = int(q.group(1))
    phrases = re.split(r", then |, ", q.group(2))
    *lines, final = row["messages"][1]["content"].split("\n")
    assert len(lines) == len(phrases) == row["steps"]
    for phrase, line in zip(phrases, lines):
        op, k = re.fullmatch(r"(add|subtract|multiply by|divide by) (\d+)", phrase.lower()).groups()
        a, sym, b, c = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)", line).groups()
        a, b, c = int(a), int(b), int(c)
        assert a == x and b == int(k) and b < 100  # each step starts from the previous result
        assert sym == {"add": "+", "subtract": "-", "multiply by": "*", "divide by": "/"}[op]
        want = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[sym]
        assert c == want and 0 < c < 1000 and (sym != "/" or a % b == 0)
        x = c
    assert final == f"#### {x}" and row["answer"] == str(x)


def check_letters(row):
    q = re.fullmatch(r"Start with the letters: ([a-z ]+)\. (.+)\. What are the letters\?", question(row))
    x = q.group(1).split(" ")
    phrases = re.split(r", then |, ", q.group(2))
    *lines, final = row["messages"][1]["content"].split("\n")
    assert len(lines) == len(phrases) == row["steps"]
    for phrase, line in zip(phrases, lines):
        phrase = phrase.lower()
        if phrase == "reverse them":
            y = x[::-1]
        elif phrase == "swap the first and last letters":
            y = x[-1:] + x[1:-1] + x[:1]
        elif phrase == "move the first letter to the end":
            y = x[1:] + x[:1]
        else:
            k = int(re.fullmatch(r"shift each letter forward by (\d)", phrase).group(1))
            y = ["abcdefghijklmnopqrstuvwxyz"[("abcdefghijklmnopqrstuvwxyz".index(c) + k) % 26] for c in x]
        before, after = line.split(": ")[1].split(" -> ")
        assert before.split(" ") == x and after.split(" ") == y
        x = y
    assert final == "#### " + " ".join(x) and row["answer"] == " ".join(x)


def test_every_row_is_worked_correctly():
    rows = read("chain_train.jsonl") + read("chain_test.jsonl")
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        (check_letters if row["family"] == "letters" else check_arith)(row)
        assert ev.extract_answer(row["messages"][1]["content"]) == row["answer"]
    assert {r["family"] for r in rows} == {"arith", "letters"} and {r["steps"] for r in rows} == {2, 3, 4}


# -----------------------------------------------------------------------------
# evaluation on a tiny random model with a byte-level chat tokenizer

class ByteTokenizer:
    """Bytes 0..255, 256 = start of turn, 257 = end of turn; the mask covers the last answer and its 257."""
    eos_ids = [257]

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def encode_chat(self, messages, add_generation_prompt=False, learn="last"):
        ids, mask = [], []
        for k, m in enumerate(messages):
            head, body = [256] + self.encode(m["role"] + "\n"), self.encode(m["content"]) + [257]
            learned = k == len(messages) - 1 and m["role"] == "assistant"
            ids += head + body
            mask += [0] * len(head) + [int(learned)] * len(body)
        if add_generation_prompt:
            head = [256] + self.encode("assistant\n")
            ids, mask = ids + head, mask + [0] * len(head)
        return ids, mask


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=260, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=64)
    return Transformer(cfg).eval(), ByteTokenizer()


def chat_rows(n):
    rows = make_data.make_splits(make_data.DataConfig(n_train=0, n_test=n))[1]
    return rows


def test_loss_equals_direct_computation(tiny):
    model, tok = tiny
    rows = chat_rows(7)  # different lengths: batches of 3 are right-padded
    got = ev.answer_losses(model, tok, rows, batch_size=3)
    for row, loss in zip(rows, got):
        ids, mask = tok.encode_chat(row["messages"])
        logits = model(torch.tensor([ids]))[0]
        nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
        m = torch.tensor(mask[1:], dtype=torch.bool)
        assert loss == pytest.approx(nll[m].mean().item(), abs=1e-5)
    res = ev.evaluate(model, tok, rows, batch_size=3, generate=False)
    assert res["loss"] == pytest.approx(sum(got) / len(got)) and res["n"] == 7


def test_exact_match_counts_correct_answers(tiny, monkeypatch):
    model, tok = tiny
    rows = chat_rows(8)
    outputs = [r["messages"][-1]["content"] for r in rows]
    outputs[3] = outputs[3].rsplit("####", 1)[0] + "#### 99999"  # one wrong final answer

    def fake_generate(model, tok, prompts, *args, **kwargs):
        for p, r in zip(prompts, rows):  # the prompt ends with the assistant header, before the answer
            text = tok.decode(p)
            assert text.endswith("assistant\n") and r["messages"][0]["content"] in text
            assert r["messages"][1]["content"] not in text
        return outputs

    monkeypatch.setattr(ev, "generate_texts", fake_generate)
    res = ev.evaluate(model, tok, rows, loss=False)
    assert res["exact_match"] == pytest.approx(100 * 7 / 8)
    assert [p["correct"] for p in res["predictions"]] == [i != 3 for i in range(8)]
    assert res["predictions"][3]["extracted"] == "99999"


def test_padded_batched_generation_equals_one_by_one(tiny):
    model, tok = tiny
    rng = torch.Generator().manual_seed(1)
    lengths = [6, 9, 6, 6, 4, 9, 6]
    prompts = [torch.randint(0, 256, (n,), generator=rng).tolist() for n in lengths]
    batched = ev.generate_texts(model, tok, prompts, max_new_tokens=10, batch_size=3)
    single = ev.generate_texts(model, tok, prompts, max_new_tokens=10, batch_size=1)
    assert batched == single and all(len(t) > 0 for t in batched)


def test_compiled_decoding_writes_the_eager_texts(tiny, compile_counter):
    """generate_texts through the compiled step over the static cache (the CUDA default): the eager texts, with
    padded batches of 3 and a last batch of 1 (a new cache and batch size: a second graph, not one per position)."""
    model, tok = tiny
    rng = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=rng).tolist() for n in [6, 9, 6, 6, 4, 9, 6]]
    eager = ev.generate_texts(model, tok, prompts, max_new_tokens=10, batch_size=3, compile=False)
    assert ev.generate_texts(model, tok, prompts, max_new_tokens=10, batch_size=3, compile=True) == eager
    assert compile_counter.frame_count == 2  # 3 batches x 9 positions


def test_training_mode_is_restored(tiny):
    model, tok = tiny
    model.train()
    ev.evaluate(model, tok, chat_rows(2), max_new_tokens=2)
    assert model.training
    model.eval()


# -----------------------------------------------------------------------------
# the command line, on a tiny random checkpoint that uses SmolLM2's tokenizer

GSM8K_SAMPLE = [  # written for this test, in the GSM8K schema
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 12 eggs. How many eggs are in 5 boxes?",
     "answer": "5 boxes hold 5 * 12 = <<5*12=60>>60 eggs.\n#### 60"},
    {"question": "Sam had 1,500 dollars and spent 250. How much is left?",
     "answer": "1,500 - 250 = <<1500-250=1250>>1,250\n#### 1,250"},
]


def test_load_gsm8k(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_SAMPLE))
    rows = ev.load_gsm8k(str(path))
    assert [r["answer"] for r in rows] == ["7", "60", "1250"]
    assert rows[0]["messages"] == [{"role": "user", "content": GSM8K_SAMPLE[0]["question"]},
                                   {"role": "assistant", "content": GSM8K_SAMPLE[0]["answer"]}]


def test_cli_end_to_end(tiny_tied_dir, tmp_path, capsys):
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_SAMPLE))
    out = tmp_path / "results.json"
    ev.main(["--init", tiny_tied_dir, "--data", os.path.join(ROOT, "data", "chain_test.jsonl"),
             "--gsm8k", str(gsm), "--limit", "4", "--max_new_tokens", "3", "--out", str(out)])
    table = capsys.readouterr().out
    assert "tiny-ckpt" in table and "chain_test" in table and "gsm8k" in table
    results = json.load(open(out))["results"]
    assert [(r["data"], r["n"]) for r in results] == [("chain_test", 4), ("gsm8k", 3)]
    for r in results:
        assert 0 <= r["exact_match"] <= 100 and r["loss"] > 0 and len(r["predictions"]) == r["n"]
        assert {"question", "answer", "output", "extracted", "correct", "loss"} <= set(r["predictions"][0])


def test_clear_errors(tiny_tied_dir, tmp_path):
    # errors.UserError: under errors.run (python eval.py) one line naming the path, exit 1
    with pytest.raises(UserError, match="nowhere"):
        ev.main(["--init", str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match="no config.json"):
        ev.main(["--init", str(tmp_path)])
    with pytest.raises(UserError, match="missing.jsonl"):
        ev.main(["--init", tiny_tied_dir, "--data", str(tmp_path / "missing.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(UserError, match="bad.jsonl: row 1"):
        ev.main(["--init", tiny_tied_dir, "--gsm8k", str(bad)])


def test_checkpoint_loads_in_float32_on_cpu_whatever_it_was_saved_in(tiny_tied_dir, tmp_path):
    bf16_dir = str(tmp_path / "bf16")
    model, _ = ev.load_checkpoint(tiny_tied_dir)
    model.to(torch.bfloat16).save_pretrained(bf16_dir, tokenizer_dir=tiny_tied_dir)
    again, tok = ev.load_checkpoint(bf16_dir, "cpu")
    assert {p.dtype for p in again.parameters()} == {torch.float32}
    assert len(tok.encode("hello")) > 0
