"""
Chat data in, token ids and answer masks out: the data side of train.py.

A source is a local .jsonl / .json / .parquet file or a Hugging Face dataset id with a split
("HuggingFaceH4/ultrachat_200k:train_sft"); "@N" after it keeps N rows drawn at random with the
seed (the paper mixes 60k UltraFeedback with 60k UltraChat:
"HuggingFaceH4/ultrafeedback_binarized:train_prefs@60000,HuggingFaceH4/ultrachat_200k:train_sft@60000").
Rows may hold
  messages:          [{"role": "user" | "assistant" | "system", "content": str}, ...]  (UltraChat)
  prompt + chosen:   chosen is the target answer, a string or the whole chosen conversation (UltraFeedback)
  prompt + response: two strings
Preference pairs (train.py --method dpo|tdpo|orpo|simpo, tokenize_pairs) add the rejected answer:
  prompt + chosen + rejected: UltraFeedback-binarized; chosen and rejected are each the whole conversation
                     (a list of messages ending with the answer) or the answer string
  messages + rejected: the bundled task; messages is the chosen conversation, rejected the other answer
                     (a string) or the whole rejected conversation
Every problem with the data stops the run here, with the file, row and what to do, before any
model is loaded.
"""
import os
import random

import numpy as np
import torch

from errors import BadValue, UserError, file_error, json_lines, parse_json, read_text

ROLES = ("system", "user", "assistant")
IGNORE = -100


class DataError(BadValue):
    """A problem with the data (a file, a row): a UserError, so scripts report it in one line, and a ValueError,
    as before."""


def parse_source(source: str):
    """'path_or_id[:split][@n]' -> (path_or_id, split, n)."""
    n = None
    if "@" in source:
        source, count = source.rsplit("@", 1)
        if not count.isdigit() or int(count) == 0:
            raise DataError(f"{source}@{count}: the row count after '@' must be a positive integer")
        n = int(count)
    split = None
    if not os.path.exists(source) and ":" in source:
        source, split = source.rsplit(":", 1)
    return source, split, n


def read_rows(source: str, seed: int = 0) -> list[dict]:
    """All rows of one source as plain dicts."""
    path, split, n = parse_source(source)
    if os.path.exists(path):
        rows = read_local(path)
    elif path.endswith((".jsonl", ".json", ".parquet")) or path.startswith((".", "/")) or path.count("/") != 1:
        raise DataError(f"{path}: no such file (a local .jsonl/.json/.parquet file or a hub id 'org/name:split')")
    else:
        rows = read_hub(path, split)
    if not rows:
        raise DataError(f"{source}: the dataset is empty")
    if n is not None:
        if n > len(rows):
            raise DataError(f"{source}: asked for {n} rows but it has {len(rows)}")
        keep = sorted(random.Random(seed).sample(range(len(rows)), n))
        rows = [rows[i] for i in keep]
    return rows


def read_local(path: str) -> list[dict]:
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; give a .jsonl, .json or .parquet file")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's ArrowInvalid on a corrupt file, an OSError
            raise DataError(str(file_error(path, e, "not a readable parquet file"))) from None
    try:
        text = read_text(path)  # bytes that are not UTF-8 are reported with their line
    except UserError as e:
        raise DataError(str(e)) from None
    if path.endswith(".json") and text.lstrip().startswith("["):
        rows = parse_json(text, path, list, DataError)
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise DataError(f"{path} row {i + 1}: a JSON file must hold a list of objects (one per example), "
                                f"not {type(r).__name__}")
        return rows
    return json_lines(text, path, DataError)


def read_hub(dataset_id: str, split: str | None) -> list[dict]:
    import datasets
    try:
        ds = datasets.load_dataset(dataset_id, split=split or "train")
    except Exception as e:  # offline, unknown id, unknown split: one message, the cause beside it
        raise DataError(f"could not load hub dataset {dataset_id!r} split {split or 'train'!r} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); when offline, "
                        "download it first or pass a local .jsonl/.json/.parquet file") from None
    return ds.to_list()


def to_messages(row: dict, where: str) -> list[dict]:
    """One row of any supported schema -> a conversation ending with the assistant's target answer."""
    if "messages" in row:
        msgs = row["messages"]
    elif "prompt" in row and ("chosen" in row or "response" in row):
        target = row["chosen"] if "chosen" in row else row["response"]
        if isinstance(target, list):  # UltraFeedback-binarized: chosen is the whole conversation
            msgs = target
        else:
            msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": target}]
    else:
        raise DataError(f"{where}: row has none of the fields 'messages', 'prompt'+'chosen', 'prompt'+'response' "
                        f"(it has {sorted(row)})")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {m.get('role')!r} (expected one of {ROLES})")
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's answer (it is {msgs[-1]['role']!r})")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def to_pair(row: dict, where: str) -> tuple[list[dict], list[dict]]:
    """One preference row -> (chosen conversation, rejected conversation). The two share everything before the
    final assistant answer; a row where they differ there is an error."""
    if "rejected" not in row:
        raise DataError(f"{where}: row has no 'rejected' field; the preference methods need prompt + chosen + "
                        f"rejected or messages + rejected (it has {sorted(row)})")
    chosen = to_messages(row, where)  # 'messages', or 'prompt' + 'chosen'
    rejected = row["rejected"]
    if isinstance(rejected, str):  # the rejected answer to the chosen conversation's prompt
        rejected = chosen[:-1] + [{"role": "assistant", "content": rejected}]
    elif isinstance(rejected, list):
        rejected = to_messages({"messages": rejected}, f"{where} (rejected)")
    else:
        raise DataError(f"{where}: 'rejected' must be a string or a list of messages, got {type(rejected).__name__}")
    if rejected[:-1] != chosen[:-1]:
        raise DataError(f"{where}: the chosen and rejected conversations differ before the final answer; "
                        "a pair must share its prompt")
    return chosen, rejected


def truncate(ids: list[int], mask: list[int], max_length: int):
    """Fit max_length tokens: keep the start of the answer, cut the prompt from the left."""
    if len(ids) <= max_length:
        return ids, mask
    a = mask.index(1) if 1 in mask else len(ids)  # first learned token
    answer = max(0, min(len(ids) - a, max_length - 1))  # leave one prompt token to predict the first answer token
    start = max(0, a - (max_length - answer))
    return ids[start:start + max_length], mask[start:start + max_length]


def tokenize_sources(sources: str, tokenizer_dir: str, max_length: int, learn: str = "last", seed: int = 0,
                     num_proc: int = 1, log=print):
    """'src1,src2,...' -> list of (ids, mask) examples. Every row is validated before anything is tokenized;
    tokenization runs through datasets' map, in num_proc processes."""
    import datasets
    convs, wheres = [], []
    for source in [s.strip() for s in sources.split(",") if s.strip()]:
        rows = read_rows(source, seed)
        wheres += [f"{source} row {i + 1}" for i in range(len(rows))]
        convs += [to_messages(r, where) for r, where in zip(rows, wheres[-len(rows):])]
    ds = datasets.Dataset.from_dict({"messages": convs, "where": wheres})  # where: the row, for errors
    ds = ds.map(_tokenize, fn_kwargs=dict(tokenizer_dir=tokenizer_dir, max_length=max_length, learn=learn),
                remove_columns=["messages", "where"], num_proc=num_proc if num_proc > 1 else None,
                desc="tokenizing", load_from_cache_file=False)
    examples = [(np.array(ids, dtype=np.int32), np.array(mask, dtype=np.bool_))
                for ids, mask in zip(ds["ids"], ds["mask"]) if any(mask[1:])]
    # a token is learned when it is predicted: position t learns ids[t + 1] if mask[t + 1]
    dropped = len(ds) - len(examples)
    # truncation always keeps one answer token, so these are empty answers whose turn ends without an
    # end-of-turn token, or answers the chat template leaves out
    if not examples:
        raise DataError(f"{sources}: no example has an answer token to learn (empty answers with no end-of-turn "
                        "token after them, or a chat template that leaves the answer out)")
    if dropped:
        log(f"data: dropped {dropped} of {len(ds)} examples with no answer token to learn (an empty answer with no "
            "end-of-turn token after it, or one the chat template leaves out)")
    return examples


def tokenize_pairs(sources: str, tokenizer_dir: str, max_length: int, learn: str = "last", seed: int = 0,
                   num_proc: int = 1, log=print):
    """'src1,src2,...' of preference rows -> list of (chosen, rejected) pairs, each side an (ids, mask) example
    as tokenize_sources makes them, truncated on its own. Every row is validated before anything is tokenized;
    pairs with a side left without answer tokens are dropped and counted."""
    import datasets
    chosen, rejected, wheres = [], [], []
    for source in [s.strip() for s in sources.split(",") if s.strip()]:
        for i, row in enumerate(read_rows(source, seed)):
            c, r = to_pair(row, f"{source} row {i + 1}")
            chosen.append(c)
            rejected.append(r)
            wheres.append(f"{source} row {i + 1}")
    ds = datasets.Dataset.from_dict({"chosen": chosen, "rejected": rejected, "where": wheres})
    ds = ds.map(_tokenize_pair, fn_kwargs=dict(tokenizer_dir=tokenizer_dir, max_length=max_length, learn=learn),
                remove_columns=["chosen", "rejected", "where"], num_proc=num_proc if num_proc > 1 else None,
                desc="tokenizing pairs", load_from_cache_file=False)
    pairs = []
    for c_ids, c_mask, r_ids, r_mask in zip(ds["c_ids"], ds["c_mask"], ds["r_ids"], ds["r_mask"]):
        if any(c_mask[1:]) and any(r_mask[1:]):  # as in tokenize_sources: the first token is never predicted
            pairs.append(((np.array(c_ids, dtype=np.int32), np.array(c_mask, dtype=np.bool_)),
                          (np.array(r_ids, dtype=np.int32), np.array(r_mask, dtype=np.bool_))))
    dropped = len(ds) - len(pairs)
    if not pairs:
        raise DataError(f"{sources}: no pair has answer tokens left on both sides after truncation to "
                        f"{max_length} tokens")
    if dropped:
        log(f"data: dropped {dropped} of {len(ds)} pairs with a side left without answer tokens after truncation "
            f"to {max_length} tokens")
    return pairs


_tokenizers = {}


def _tokenize(row, tokenizer_dir, max_length, learn):
    from tokenizer import Tokenizer  # loaded once per worker process
    if tokenizer_dir not in _tokenizers:
        _tokenizers[tokenizer_dir] = Tokenizer.from_pretrained(tokenizer_dir)
    try:
        ids, mask = truncate(*_tokenizers[tokenizer_dir].encode_chat(row["messages"], learn=learn), max_length)
    except UserError as e:  # the chat template failed on this row (it names the template): add the row
        raise DataError(f"{row.get('where', 'a row')}: {e}") from None
    return {"ids": ids, "mask": mask}


def _tokenize_pair(row, tokenizer_dir, max_length, learn):
    where = row.get("where", "a row")
    c = _tokenize({"messages": row["chosen"], "where": where}, tokenizer_dir, max_length, learn)
    r = _tokenize({"messages": row["rejected"], "where": f"{where} (rejected)"}, tokenizer_dir, max_length, learn)
    return {"c_ids": c["ids"], "c_mask": c["mask"], "r_ids": r["ids"], "r_mask": r["mask"]}


def collate(examples, pad_id: int = 0):
    """Right-padded inputs x (B, T) and targets y (B, T): y[t] = x[t+1] on answer tokens, IGNORE elsewhere.
    Causal attention means padding at the end never changes the real positions."""
    T = max(len(ids) for ids, _ in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, (ids, mask) in enumerate(examples):
        ids, mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask)
        n = len(ids) - 1
        x[b, :n] = ids[:-1]
        y[b, :n] = torch.where(mask[1:], ids[1:], IGNORE)
    return x, y


def batch_indices(step: int, micro: int, rank: int, world: int, batch_size: int, grad_accum: int, n: int, seed: int):
    """Example indices of one micro-batch. The order is a seeded permutation per epoch, and optimizer step s owns
    the slice [s*G, (s+1)*G) of the endless stream, G = batch_size * grad_accum * world: the data position is a
    function of the step, so a resumed run sees exactly the examples the uninterrupted run would have seen, and
    N processes with k accumulation steps see the same batches as one process with N*k."""
    G = batch_size * grad_accum * world
    start = step * G + (micro * world + rank) * batch_size
    out = []
    for i in range(start, start + batch_size):
        epoch, j = divmod(i, n)
        perm = epoch_permutation(n, seed, epoch)
        out.append(int(perm[j]))
    return out


_perm_cache = {}


def epoch_permutation(n: int, seed: int, epoch: int):
    key = (n, seed, epoch)
    if key not in _perm_cache:
        _perm_cache.clear()
        _perm_cache[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _perm_cache[key]
