"""make_data.py's preference pairs: every rejected answer is a worked solution that slips at exactly one step
and carries the error to the end, in the format of the correct answer; the pairs are deterministic; and the
fields the task had before it had pairs are byte for byte what the earlier make_data.py wrote."""
import hashlib
import json
import random
import re

import pytest

import eval as ev
import make_data

# sha256 of data/chain_{train,test}.jsonl as the make_data.py before pairs wrote them (commit 7a7524c), one
# json.dumps line per row: the pairs must leave every earlier field and row as it was
BEFORE_PAIRS = {"train": "b76eb3998592e6dcf8726cfa8d67f7cb5c83df547d6fa5d5591c25344c5f2ca4",
                "test": "a8b6f6d131925f697cfb8d56eb999cff9eefb5b1e60b2a2090e123fcd697e23b"}
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def splits():
    train, test = make_data.make_splits(make_data.DataConfig())  # the shipped files, 4,200 rows, about 0.5 s
    return {"train": train, "test": test}


def worked_lines(row: dict, reply: str) -> tuple:
    """(indices of the worked lines whose own result is wrong, the answer after '#### ') for a reply to the row's
    question. Asserts what every reply must do: one line per step of the question, each starting from the
    previous line's result (the question's start for the first), results in the task's ranges, and a last line
    '#### ' followed by the last result."""
    question = row["messages"][0]["content"]
    *lines, final = reply.split("\n")
    assert len(lines) == row["steps"] and final.startswith("#### ")
    wrong = []
    if row["family"] == "arith":
        q = re.fullmatch(r"Start with (\d+)\. (.+)\. What is the result\?", question)
        x = int(q.group(1))
        for j, (phrase, line) in enumerate(zip(re.split(r", then |, ", q.group(2)), lines)):
            op, k = re.fullmatch(r"(add|subtract|multiply by|divide by) (\d+)", phrase.lower()).groups()
            a, sym, b, c = re.fullmatch(r"(\d+) ([-+*/]) (\d+) = (\d+)", line).groups()
            assert (int(a), sym, b) == (x, {"add": "+", "subtract": "-", "multiply by": "*", "divide by": "/"}[op], k)
            c = int(c)
            assert 1 <= c <= 999 and (sym != "/" or x % int(k) == 0)
            if c != {"+": x + int(k), "-": x - int(k), "*": x * int(k), "/": x // int(k)}[sym]:
                wrong.append(j)
            x = c
        answer = str(x)
    else:
        q = re.fullmatch(r"Start with the letters: ([a-z ]+)\. (.+)\. What are the letters\?", question)
        x = q.group(1).split(" ")
        for j, (phrase, line) in enumerate(zip(re.split(r", then |, ", q.group(2)), lines)):
            before, after = (s.split(" ") for s in line.split(": ")[1].split(" -> "))
            assert before == x and len(after) == len(x)
            phrase = phrase.lower()
            if phrase == "reverse them":
                want = x[::-1]
            elif phrase == "swap the first and last letters":
                want = x[-1:] + x[1:-1] + x[:1]
            elif phrase == "move the first letter to the end":
                want = x[1:] + x[:1]
            else:
                k = int(re.fullmatch(r"shift each letter forward by (\d)", phrase).group(1))
                want = [LETTERS[(LETTERS.index(c) + k) % 26] for c in x]
            if after != want:
                wrong.append(j)
                # the slip: one letter, one place away in the alphabet (wrapping)
                diff = [(a, b) for a, b in zip(after, want) if a != b]
                assert len(diff) == 1 and (LETTERS.index(diff[0][0]) - LETTERS.index(diff[0][1])) % 26 in (1, 25)
            x = after
        answer = " ".join(x)
    assert final == f"#### {answer}"
    return wrong, answer


def test_rejected_answer_slips_once_and_carries_the_error_to_the_end(splits):
    slipped_at = set()
    for row in splits["train"] + splits["test"]:
        chosen, rejected = row["messages"][1]["content"], row["rejected"]
        assert isinstance(rejected, str) and rejected != chosen
        assert worked_lines(row, chosen) == ([], row["answer"])
        wrong, answer = worked_lines(row, rejected)  # same format as the chosen answer, checked line by line
        assert len(wrong) == 1 and answer != row["answer"]
        assert ev.extract_answer(rejected) != ev.normalize(row["answer"])  # and the scorer calls it wrong
        # every line before the slip is the chosen answer's own
        assert rejected.split("\n")[:wrong[0]] == chosen.split("\n")[:wrong[0]]
        if row["family"] == "arith":
            i = wrong[0]
            off = int(rejected.split("\n")[i].split(" = ")[1]) - int(chosen.split("\n")[i].split(" = ")[1])
            assert 1 <= abs(off) <= 9
        slipped_at.add((row["family"], row["steps"], wrong[0]))
    # the slip falls on every step of every length, in both families
    assert slipped_at == {(f, n, i) for f in ("arith", "letters") for n in (2, 3, 4) for i in range(n)}


def test_pairs_are_deterministic_and_depend_on_the_question_only(splits):
    cfg = make_data.DataConfig(n_train=200, n_test=20)
    train, test = make_data.make_splits(cfg)
    assert (train, test) == make_data.make_splits(cfg)
    # another split of the same stream: the same questions get the same rejected answers
    by_question = {r["messages"][0]["content"]: r["rejected"] for r in splits["train"] + splits["test"]}
    assert all(by_question[r["messages"][0]["content"]] == r["rejected"] for r in train + test)
    # the slips come from a stream of their own, seeded by --seed: from the same state of the problem stream,
    # another seed gives the same rows with other slips
    a = [make_data.make_row(random.Random(k), make_data.DataConfig(seed=1)) for k in range(20)]
    b = [make_data.make_row(random.Random(k), make_data.DataConfig(seed=2)) for k in range(20)]
    assert [r["messages"] for r in a] == [r["messages"] for r in b]
    assert sum(x["rejected"] != y["rejected"] for x, y in zip(a, b)) >= 10


def test_earlier_fields_are_unchanged_byte_for_byte(splits):
    for name, rows in splits.items():
        before = [{k: v for k, v in r.items() if k != "rejected"} for r in rows]
        assert [list(r) for r in rows] == [["messages", "answer", "family", "steps", "rejected"]] * len(rows)
        text = "".join(json.dumps(r) + "\n" for r in before)
        assert hashlib.sha256(text.encode()).hexdigest() == BEFORE_PAIRS[name], name


def test_docstring_sample_pair_is_the_first_training_row(splits):
    doc = make_data.__doc__
    chosen = re.search(r"chosen: +(.+)", doc).group(1)
    rejected = re.search(r"rejected: +(.+)", doc).group(1)
    row = splits["train"][0]
    assert row["messages"][0]["content"] in doc
    assert chosen == row["messages"][1]["content"].replace("\n", " | ")
    assert rejected == row["rejected"].replace("\n", " | ")
