"""data.py: schemas, truncation, targets, and the step -> examples map that DDP and resume rely on."""
import json

import numpy as np
import pytest

from data import IGNORE, DataError, batch_indices, collate, parse_source, read_rows, to_messages, truncate


def test_schemas_become_conversations():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert to_messages({"messages": msgs}, "r") == msgs
    assert to_messages({"prompt": "q", "chosen": "a", "rejected": "b"}, "r") == msgs
    assert to_messages({"prompt": "q", "chosen": msgs, "rejected": []}, "r") == msgs  # UltraFeedback-binarized
    assert to_messages({"prompt": "q", "response": "a"}, "r") == msgs
    with pytest.raises(DataError, match="last message must be the assistant"):
        to_messages({"messages": msgs[:1]}, "r")


def test_parse_source():
    assert parse_source("org/name:train_sft@600") == ("org/name", "train_sft", 600)
    assert parse_source("org/name") == ("org/name", None, None)
    with pytest.raises(DataError, match="positive integer"):
        parse_source("org/name@x")


def test_row_subsample_is_seeded(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"prompt": str(i), "response": "r"}) + "\n" for i in range(50)))
    a, b = read_rows(f"{p}@10", seed=3), read_rows(f"{p}@10", seed=3)
    assert a == b and len(a) == 10 and a != read_rows(f"{p}@10", seed=4)
    with pytest.raises(DataError, match="asked for 60 rows but it has 50"):
        read_rows(f"{p}@60")


def test_truncate_keeps_answer_start_and_cuts_prompt_left():
    ids = list(range(10))
    mask = [0] * 6 + [1] * 4  # prompt 0..5, answer 6..9
    assert truncate(ids, mask, 10) == (ids, mask)
    assert truncate(ids, mask, 6) == ([4, 5, 6, 7, 8, 9], [0, 0, 1, 1, 1, 1])
    # answer longer than the room: keep one prompt token (it predicts the first answer token), then the answer start
    assert truncate(ids, mask, 3) == ([5, 6, 7], [0, 1, 1])


def test_collate_targets_are_next_answer_tokens():
    ex = [(np.array([5, 6, 7, 8], np.int32), np.array([0, 0, 1, 1], bool)),
          (np.array([9, 10, 11], np.int32), np.array([0, 1, 1], bool))]
    x, y = collate(ex, pad_id=0)
    assert x.tolist() == [[5, 6, 7], [9, 10, 0]]
    assert y.tolist() == [[IGNORE, 7, 8], [10, 11, IGNORE]]


def test_batch_indices_cover_each_epoch_once_and_split_across_ranks():
    n, B, k = 40, 2, 3
    one = [i for s in range(5) for m in range(2 * k) for i in batch_indices(s, m, 0, 1, B, 2 * k, n, seed=1)]
    two = [i for s in range(5) for m in range(k) for r in range(2) for i in batch_indices(s, m, r, 2, B, k, n, seed=1)]
    assert one == two  # 2 ranks x k micro-steps see the same examples, in the same groups, as 1 rank x 2k
    assert sorted(one[:n]) == list(range(n))  # the first epoch is a permutation
    assert one[:n] != one[n:2 * n]  # and the next epoch another one


def test_jsonl_json_and_parquet_read_the_same_rows(tmp_path):
    import datasets
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for ext in ("jsonl", "json", "parquet"):
        assert read_rows(str(tmp_path / f"d.{ext}")) == rows, ext


def test_learn_all_turns_masks_every_assistant_turn(tmp_path, smollm2_dir):
    from data import tokenize_sources
    from tokenizer import Tokenizer
    conv = {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "first answer"},
                         {"role": "user", "content": "two"}, {"role": "assistant", "content": "second answer"}]}
    (tmp_path / "c.jsonl").write_text(json.dumps(conv) + "\n")
    tok = Tokenizer.from_pretrained(smollm2_dir)
    learned = {}
    for learn in ("last", "all"):
        (ids, mask), = tokenize_sources(str(tmp_path / "c.jsonl"), smollm2_dir, 256, learn, log=lambda *a: None)
        learned[learn] = tok.decode([int(t) for t, m in zip(ids, mask) if m])
    assert "second answer" in learned["last"] and "first answer" not in learned["last"]
    assert "first answer" in learned["all"] and "second answer" in learned["all"]


def _plain_template_dir(tmp_path, smollm2_dir):
    """SmolLM2's tokenizer with a chat template whose turns end in plain text, not an end-of-turn token."""
    import shutil
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{smollm2_dir}/{name}", tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                                                 "{% endfor %}")
    return str(tmp_path)


def test_examples_without_an_answer_token_are_dropped_and_counted(tmp_path, smollm2_dir):
    """With the checkpoint's own template an empty answer still learns its end-of-turn token, and --max_length
    always keeps one answer token; with a template that ends turns in plain text, an empty answer leaves nothing
    to learn: that example is dropped and the log says how many."""
    from data import tokenize_sources
    rows = [{"prompt": f"q{i}", "response": "" if i == 1 else f"answer {i}"} for i in range(4)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logged = []
    kept = tokenize_sources(str(tmp_path / "d.jsonl"), smollm2_dir, 4, log=logged.append)
    assert len(kept) == 4 and not logged  # four tokens hold no whole prompt, yet every example keeps an answer
    plain = _plain_template_dir(tmp_path, smollm2_dir)
    kept = tokenize_sources(str(tmp_path / "d.jsonl"), plain, 64, log=logged.append)
    assert len(kept) == 3 and len(logged) == 1
    assert logged[0].startswith("data: dropped 1 of 4 examples with no answer token to learn"), logged
    (tmp_path / "empty.jsonl").write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match="no example has an answer token to learn"):
        tokenize_sources(str(tmp_path / "empty.jsonl"), plain, 64, log=logged.append)


def test_pairs_with_an_empty_side_are_dropped_and_counted(tmp_path, smollm2_dir):
    """Preference rows (UltraFeedback's string form) under a template that ends turns in plain text: a pair
    whose rejected answer leaves no token to learn is dropped, the log says how many, and a file of only such
    pairs stops with one message."""
    from data import tokenize_pairs
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": "" if i == 2 else f"bad {i}"} for i in range(3)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = _plain_template_dir(tmp_path, smollm2_dir)
    logged = []
    pairs = tokenize_pairs(str(tmp_path / "p.jsonl"), plain, 64, log=logged.append)
    assert len(pairs) == 2 and len(logged) == 1
    assert logged[0].startswith("data: dropped 1 of 3 pairs with a side left without answer tokens"), logged
    (tmp_path / "empty.jsonl").write_text(json.dumps(rows[2]) + "\n")
    with pytest.raises(DataError, match="no pair has answer tokens left on both sides"):
        tokenize_pairs(str(tmp_path / "empty.jsonl"), plain, 64, log=logged.append)
