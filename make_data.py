"""
A small synthetic task with worked steps, where each step starts from the previous step's result:
one early mistake derails everything after it. This is where IFT is claimed to help most (GSM8K-style
token-by-token reasoning, exposure bias; Hua et al. 2025, arXiv 2405.11870), in a form that a 135M
model can learn on a CPU and that can be scored exactly.

Two families, 2-4 steps each (the number of steps is the difficulty level):
- arith (75%): integer chains with + - * /, operands < 100, every intermediate result in 1..999;
- letters (25%): 3-5 letters written with spaces (one token each), transformed step by step
  (reverse, shift forward, swap first and last, move first to end).
The final answer follows "#### " (GSM8K's convention), so one scorer serves this task and GSM8K.

Sample rows of data/chain_train.jsonl (user -> assistant, newlines shown as |):
  Start with 17. Add 25, multiply by 3, then subtract 48. What is the result?
    -> 17 + 25 = 42 | 42 * 3 = 126 | 126 - 48 = 78 | #### 78
  Start with the letters: c a t. Reverse them, then shift each letter forward by 2. What are the letters?
    -> reverse: c a t -> t a c | shift +2: t a c -> v c e | #### v c e

Preference pairs for DPO, ORPO, SimPO and TDPO (train.py --method ...): every row, training and held-out
(so a held-out preference accuracy can be computed), also holds "rejected", a wrong worked answer to the same
question, like the sub-optimal path of Frozen Lake. It slips at one step and carries the error to the end:
arith: one step's result is off by 1..9 either way; letters: one letter of one step's result is its neighbour
in the alphabet. Every later step is worked correctly from the wrong value, so the lines, the format and the
"#### " line are those of a correct answer and only the final answer is wrong (asserted). The step and the
error are drawn from a stream of their own, seeded by --seed and the question, so "messages", "answer",
"family" and "steps" are byte for byte what this script wrote before it wrote pairs. Fixed before any result
was seen, and not tuned toward any method. The first training row (chosen -> rejected):
  Start with 34. Add 11, subtract 8, subtract 6, then subtract 9. What is the result?
    chosen:   34 + 11 = 45 | 45 - 8 = 37 | 37 - 6 = 31 | 31 - 9 = 22 | #### 22
    rejected: 34 + 11 = 45 | 45 - 8 = 30 | 30 - 6 = 24 | 24 - 9 = 15 | #### 15

Fixed seed, deterministic; held-out rows never appear in the training file (asserted).
Usage: python make_data.py [--seed 1337] [--n_train 4000] [--n_test 200] [--out_dir data]
"""
import json
import os
import random
import string
from dataclasses import asdict, dataclass, fields

from errors import ArgumentParser, HelpFormatter, field_comments, run


@dataclass
class DataConfig:  # each field's comment is its --help text
    seed: int = 1337         # seed of every random choice: the same seed writes the same files
    n_train: int = 4000      # training rows
    n_test: int = 200        # held-out rows
    min_steps: int = 2       # fewest operations in one chain
    max_steps: int = 4       # most operations in one chain
    p_letters: float = 0.25  # share of the letters family
    out_dir: str = "data"    # where chain_train.jsonl and chain_test.jsonl are written (replaced when there)


# -----------------------------------------------------------------------------
# arithmetic chains

SYMBOL = {"add": "+", "subtract": "-", "multiply": "*", "divide": "/"}


def arith_options(x: int) -> list:
    """Every (op, operand) allowed from x: operands < 100, the result stays in 1..999."""
    opts = [("add", k) for k in range(2, 100) if x + k < 1000]
    opts += [("subtract", k) for k in range(1, min(100, x))]
    opts += [("multiply", m) for m in range(2, 10) if x * m < 1000]
    opts += [("divide", d) for d in range(2, 10) if x % d == 0]
    return opts


def apply_arith(x: int, op: str, k: int) -> int:
    return {"add": x + k, "subtract": x - k, "multiply": x * k, "divide": x // k}[op]


def arith_problem(rng: random.Random, n_steps: int) -> dict:
    x = start = rng.randint(2, 99)
    phrases, lines, ops = [], [], []
    for _ in range(n_steps):
        # pick the operation first, then its operand, so that rare ops (divide) still show up
        opts = arith_options(x)
        op = rng.choice(sorted({o for o, _ in opts}))
        k = rng.choice([k for o, k in opts if o == op])
        y = apply_arith(x, op, k)
        phrases.append(f"{op} {k}" if op in ("add", "subtract") else f"{op} by {k}")
        lines.append(arith_line(x, op, k, y))
        ops.append((op, k))
        x = y
    question = f"Start with {start}. {join_steps(phrases)}. What is the result?"
    return dict(question=question, work=lines, answer=str(x), start=start, ops=ops)


def arith_line(x: int, op: str, k: int, y: int) -> str:
    return f"{x} {SYMBOL[op]} {k} = {y}"


def arith_slip(start: int, ops: list, rng: random.Random) -> tuple:
    """(worked lines, answer) with one slip: the result of one step is off by 1..9 either way, and every later
    step is worked correctly from the wrong value. Only slips that keep the chain in the task's ranges (results
    in 1..999, exact divisions) are drawn: first the step, among those that allow one, then the error."""
    def worked(i: int, err: int):  # lines and answer when step i's result is off by err; None if out of range
        x, lines = start, []
        for j, (op, k) in enumerate(ops):
            if op == "divide" and x % k:  # a later division from the wrong value would not be exact
                return None
            y = apply_arith(x, op, k) + (err if j == i else 0)
            if not 1 <= y <= 999:
                return None
            lines.append(arith_line(x, op, k, y))
            x = y
        return lines, str(x)

    errors = [e for d in range(1, 10) for e in (-d, d)]
    options = {i: [e for e in errors if worked(i, e)] for i in range(len(ops))}
    i = rng.choice([i for i in options if options[i]])  # the last step always allows one: its result is 1..999
    return worked(i, rng.choice(options[i]))


# -----------------------------------------------------------------------------
# letter transformations

def shift(letters: list, k: int) -> list:
    return [chr((ord(c) - ord("a") + k) % 26 + ord("a")) for c in letters]


def apply_letters(letters: list, op: str, k: int) -> list:
    if op == "reverse":
        return letters[::-1]
    if op == "shift":
        return shift(letters, k)
    if op == "swap":
        return [letters[-1]] + letters[1:-1] + [letters[0]]
    return letters[1:] + letters[:1]  # rotate: the first letter moves to the end


LETTER_OPS = {  # op -> (phrase in the question, label in the worked step)
    "reverse": ("reverse them", "reverse"),
    "shift": ("shift each letter forward by {k}", "shift +{k}"),
    "swap": ("swap the first and last letters", "swap first and last"),
    "rotate": ("move the first letter to the end", "move first to end"),
}


def letters_problem(rng: random.Random, n_steps: int) -> dict:
    letters = start = rng.choices(string.ascii_lowercase, k=rng.randint(3, 5))
    phrases, lines, ops = [], [], []
    for _ in range(n_steps):
        op = rng.choice(sorted(LETTER_OPS))
        k = rng.randint(1, 3) if op == "shift" else 0
        new = apply_letters(letters, op, k)
        phrase = LETTER_OPS[op][0].format(k=k)
        phrases.append(phrase)
        lines.append(letters_line(op, k, letters, new))
        ops.append((op, k))
        letters = new
    question = f"Start with the letters: {' '.join(start)}. {join_steps(phrases)}. What are the letters?"
    return dict(question=question, work=lines, answer=" ".join(letters), start=start, ops=ops)


def letters_line(op: str, k: int, before: list, after: list) -> str:
    return f"{LETTER_OPS[op][1].format(k=k)}: {' '.join(before)} -> {' '.join(after)}"


def letters_slip(start: list, ops: list, rng: random.Random) -> tuple:
    """(worked lines, answer) with one slip: in the result of one step (drawn), one letter (drawn) is its
    neighbour in the alphabet (drawn: one back or one forward, wrapping like the shift), and every later step
    is worked correctly from the wrong letters. Every op is a bijection, so the answer ends wrong."""
    i = rng.randrange(len(ops))
    letters, lines = start, []
    for j, (op, k) in enumerate(ops):
        new = apply_letters(letters, op, k)
        if j == i:
            pos = rng.randrange(len(new))
            new = new[:pos] + shift(new[pos:pos + 1], rng.choice((-1, 1))) + new[pos + 1:]
        lines.append(letters_line(op, k, letters, new))
        letters = new
    return lines, " ".join(letters)


# -----------------------------------------------------------------------------

def join_steps(phrases: list) -> str:
    # "Add 25, multiply by 3, then subtract 48"
    text = ", ".join(phrases[:-1]) + ", then " + phrases[-1] if len(phrases) > 1 else phrases[0]
    return text[0].upper() + text[1:]


def make_row(rng: random.Random, cfg: DataConfig) -> dict:
    n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
    family = "letters" if rng.random() < cfg.p_letters else "arith"
    p = (letters_problem if family == "letters" else arith_problem)(rng, n_steps)
    reply = "\n".join(p["work"]) + f"\n#### {p['answer']}"
    messages = [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": reply}]
    # the rejected answer draws from its own stream, seeded by the seed and the question, so the rows above are
    # the ones the task had before it had pairs, and each pair depends on its question only
    slip_rng = random.Random(f"{cfg.seed}:rejected:{p['question']}")
    work, wrong = (letters_slip if family == "letters" else arith_slip)(p["start"], p["ops"], slip_rng)
    rejected = "\n".join(work) + f"\n#### {wrong}"
    assert wrong != p["answer"] and rejected != reply, p["question"]
    return dict(messages=messages, answer=p["answer"], family=family, steps=n_steps, rejected=rejected)


def make_splits(cfg: DataConfig) -> tuple:
    """(train, test) lists of rows: one seeded stream of distinct questions, test taken first."""
    rng = random.Random(cfg.seed)
    rows, seen = [], set()
    while len(rows) < cfg.n_test + cfg.n_train:
        row = make_row(rng, cfg)
        q = row["messages"][0]["content"]
        if q not in seen:  # a repeated question would leak between the splits
            seen.add(q)
            rows.append(row)
    test, train = rows[:cfg.n_test], rows[cfg.n_test:]
    overlap = {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in test}
    assert not overlap, f"{len(overlap)} test questions are also in train"
    return train, test


def write_jsonl(path: str, rows: list):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    comments = field_comments(DataConfig)
    for f in fields(DataConfig):
        parser.add_argument(f"--{f.name}", type=f.type, default=f.default, help=comments[f.name])
    cfg = DataConfig(**vars(parser.parse_args(argv)))
    if cfg.n_train < 1 or cfg.n_test < 1 or not 1 <= cfg.min_steps <= cfg.max_steps or not 0 <= cfg.p_letters <= 1:
        parser.error("--n_train and --n_test must be >= 1, 1 <= --min_steps <= --max_steps, --p_letters in [0, 1]")
    train, test = make_splits(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    for name, rows in (("chain_train", train), ("chain_test", test)):
        path = os.path.join(cfg.out_dir, f"{name}.jsonl")
        write_jsonl(path, rows)
        mix = {k: sum(r["family"] == k for r in rows) for k in ("arith", "letters")}
        print(f"wrote {len(rows)} rows to {path} ({mix['arith']} arith, {mix['letters']} letters)")
    print(f"config: {asdict(cfg)}")


if __name__ == "__main__":
    run(main)
