"""
Evaluate checkpoints on held-out chat data with two numbers per checkpoint and data set:
- exact match: greedy decoding from the chat prompt, the final answer taken after "####" (GSM8K's
  convention; fallback: the last number in the text), compared after light normalization;
- held-out loss: the SFT loss of the reference answers, i.e. the mean token NLL of each answer
  (the tokens encode_chat masks in, closing end-of-turn token included), then the mean over rows.

  python eval.py --init out/ift --init checkpoints/SmolLM2-135M-Instruct --data data/chain_test.jsonl
  python eval.py --init out/sft --gsm8k gsm8k_test.jsonl --limit 100 --out results.json

Data: chat rows {"messages": [...], "answer": "78"} (make_data.py), and with --gsm8k rows in the GSM8K
schema {"question": ..., "answer": "... #### 42"}. From python: evaluate(model, tok, rows) -> dict,
and load_rows(path) / load_gsm8k(path) to read the files.
"""
import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

import ift
from data import collate
from model import Transformer, decoding_dtype, pick_device
from tokenizer import Tokenizer


@dataclass
class EvalConfig:
    init: list = field(default_factory=list)  # checkpoint directories (train.py outputs or a base model)
    data: str = "data/chain_test.jsonl"       # chat rows; "" to skip
    gsm8k: str = ""                           # GSM8K-schema rows, optional
    max_new_tokens: int = 128
    batch_size: int = 16
    limit: int = 0                            # first N rows of each data set; 0 = all
    out: str = ""                             # JSON file for metrics and per-example predictions
    device: str = "auto"                      # cuda when there is one (bf16 weights), else cpu (float32)
    compile_decode: bool | None = None        # one compiled decoding step (CUDA graph); None: on CUDA only


# -----------------------------------------------------------------------------
# answers

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def normalize(ans: str) -> str:
    """'  1,234.' -> '1234'; '$18.00' -> '18'; other text is only stripped."""
    ans = ans.strip().rstrip(".").strip()
    if NUMBER.fullmatch(ans.lstrip("$")):
        ans = ans.lstrip("$").replace(",", "")
        if "." in ans and float(ans) == int(float(ans)):
            ans = ans.split(".")[0]  # 18.00 -> 18
    return ans


def extract_answer(text: str) -> str:
    """The first line after the first "####"; without one the last number in the text; else ""."""
    if "####" in text:
        return normalize(text.split("####", 1)[1].strip().split("\n")[0])
    numbers = NUMBER.findall(text)
    return normalize(numbers[-1]) if numbers else ""


# -----------------------------------------------------------------------------
# data

def read_jsonl(path: str) -> list:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
    if not rows:
        raise ValueError(f"data file {path!r} has no rows")
    return rows


def load_rows(path: str) -> list:
    """Chat rows {"messages": [..., {"role": "assistant", ...}], "answer": str}."""
    rows = read_jsonl(path)
    for n, r in enumerate(rows, 1):
        msgs = r.get("messages") if isinstance(r, dict) else None
        if not msgs or msgs[-1].get("role") != "assistant" or "answer" not in r:
            raise ValueError(f"{path}: row {n}: want messages ending in an assistant turn, and an answer")
    return rows


def load_gsm8k(path: str) -> list:
    """GSM8K rows {"question", "answer": "... #### 42"} as chat rows: the question is the user turn."""
    rows = []
    for n, r in enumerate(read_jsonl(path), 1):
        if not isinstance(r, dict) or "question" not in r or "####" not in r.get("answer", ""):
            raise ValueError(f"{path}: row {n} is not a GSM8K row (question, answer with '#### ')")
        msgs = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        rows.append(dict(messages=msgs, answer=extract_answer(r["answer"])))
    return rows


# -----------------------------------------------------------------------------
# the two measurements

@torch.no_grad()
def generate_texts(model, tok, prompts: list, max_new_tokens: int = 128, batch_size: int = 16,
                   progress: bool = False, compile: bool | None = None) -> list:
    """Greedy continuations of token-id prompts, decoded up to (not including) the first eos. Prompts are
    batched in length order, left-padded, with the padding masked (model.generate's pad). compile: decode with
    one compiled step over a static cache (decode.py; the same tokens); None = on CUDA only."""
    device = model.embed_tokens.weight.device
    eos = set(tok.eos_ids)
    texts = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # little padding per batch
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress)  # kept: what follows starts a new line
    for start in range(0, len(order), batch_size):
        b = order[start:start + batch_size]
        T = max(len(prompts[i]) for i in b)
        pad = torch.tensor([T - len(prompts[i]) for i in b], device=device)
        idx = torch.tensor([[0] * (T - len(prompts[i])) + list(prompts[i]) for i in b], device=device)
        new = model.generate(idx, max_new_tokens, temperature=0, eos_ids=tok.eos_ids, pad=pad, compile=compile)[:, T:]
        for i, ids in zip(b, new.tolist()):
            end = next((k for k, t in enumerate(ids) if t in eos), len(ids))
            texts[i] = tok.decode(ids[:end])
        bar.update(len(b))
    bar.close()
    return texts


@torch.no_grad()
def answer_losses(model, tok, rows: list, batch_size: int = 16, progress: bool = False) -> list:
    """Per row: the mean NLL of the reference answer tokens given everything before them (the SFT loss)."""
    device = model.embed_tokens.weight.device
    encoded = [tok.encode_chat(r["messages"]) for r in rows]  # (ids, mask) with mask 1 on answer tokens
    losses = [None] * len(rows)
    # sorted by length, so a batch needs little right-padding; causal attention keeps real positions exact
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i][0]))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    for b in tqdm(batches, desc="loss", disable=not progress):
        for i in b:
            if not any(encoded[i][1][1:]):
                raise ValueError(f"row {i} has no answer tokens to score")
        # right-padded inputs and -100 targets off the answer (data.collate, as in training); only answer
        # positions are projected to the vocabulary (ift.chunked_nll)
        idx, targets = (t.to(device) for t in collate([(np.array(encoded[i][0]), np.array(encoded[i][1], bool))
                                                       for i in b]))
        nll = model(idx, head=partial(ift.chunked_nll, targets=targets))  # (B, T), 0 off the answer
        keep = targets != ift.IGNORE
        per_row = nll.sum(1) / keep.sum(1)
        for j, i in enumerate(b):
            losses[i] = per_row[j].item()
    return losses


def evaluate(model, tok, rows: list, max_new_tokens: int = 128, batch_size: int = 16, generate: bool = True,
             loss: bool = True, progress: bool = False, compile_decode: bool | None = None) -> dict:
    """Exact match (%) of greedy answers and the held-out loss over rows (chat rows with an "answer").
    Runs under the caller's autocast, if any; restores model.train() if it was training.
    Returns {"n", "exact_match", "loss", "seconds", "by_group", "predictions": [...]}."""
    t0 = time.time()
    was_training = model.training
    model.eval()
    res = {"n": len(rows)}
    # the last user turn and the reference answer, then what the model does with them
    preds = [{"question": r["messages"][-2]["content"] if len(r["messages"]) > 1 else "",
              "answer": r["answer"]} for r in rows]
    if loss:
        losses = answer_losses(model, tok, rows, batch_size, progress)
        res["loss"] = sum(losses) / len(losses)
        for p, x in zip(preds, losses):
            p["loss"] = x
    if generate:
        # the prompt is every turn before the final assistant turn
        prompts = [tok.encode_chat(r["messages"][:-1], add_generation_prompt=True)[0] for r in rows]
        texts = generate_texts(model, tok, prompts, max_new_tokens, batch_size, progress, compile_decode)
        for p, text in zip(preds, texts):
            p.update(output=text, extracted=extract_answer(text))
            p["correct"] = p["extracted"] == normalize(p["answer"])
        res["exact_match"] = 100 * sum(p["correct"] for p in preds) / len(preds)
        # per family and number of steps, when the rows say (make_data.py rows do)
        groups = {}
        for r, p in zip(rows, preds):
            if "family" in r and "steps" in r:
                groups.setdefault(f"{r['family']}-{r['steps']}", []).append(p["correct"])
        res["by_group"] = {k: 100 * sum(v) / len(v) for k, v in sorted(groups.items())}
    model.train(was_training)
    res["seconds"] = time.time() - t0
    res["predictions"] = preds
    return res


# -----------------------------------------------------------------------------

def check_checkpoint(path: str):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"checkpoint directory {path!r} has no config.json (not an HF checkpoint)")


def load_checkpoint(path: str, device: str = "auto"):
    """(model, tokenizer) from an HF checkpoint directory, errors naming the directory. The device by the
    scripts' rule (model.pick_device), weights in model.decoding_dtype (bf16 on CUDA, float32 on CPU)."""
    check_checkpoint(path)
    dev = pick_device(device)
    try:
        model = Transformer.from_pretrained(path, dtype=decoding_dtype(dev), device=dev)
        tok = Tokenizer.from_pretrained(path)
    except Exception as e:
        raise RuntimeError(f"cannot load checkpoint {path!r}: {type(e).__name__}: {e}") from e
    return model, tok


def print_table(results: list):
    print(f"{'checkpoint':<32} {'data':<14} {'exact%':>7} {'loss':>7} {'n':>5} {'sec':>7}")
    for r in results:
        em = f"{r['exact_match']:.1f}" if "exact_match" in r else "-"
        loss = f"{r['loss']:.4f}" if "loss" in r else "-"
        print(f"{r['name'][-32:]:<32} {r['data']:<14} {em:>7} {loss:>7} {r['n']:>5} {r['seconds']:>7.1f}")


def main(argv=None):
    d = EvalConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", nargs="+", action="extend", required=True, help="checkpoint dir(s), repeatable")
    p.add_argument("--data", default=d.data, help="chat-row JSONL ('' to skip)")
    p.add_argument("--gsm8k", default=d.gsm8k, help="GSM8K-schema JSONL (question, answer '... #### 42')")
    p.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--batch_size", type=int, default=d.batch_size)
    p.add_argument("--limit", type=int, default=d.limit, help="first N rows of each data set (0: all)")
    p.add_argument("--out", default=d.out, help="write metrics and per-example predictions to this JSON file")
    p.add_argument("--device", default=d.device, help="auto (cuda when there is one), cuda (bf16 weights) or cpu")
    p.add_argument("--compile_decode", action=argparse.BooleanOptionalAction, default=d.compile_decode,
                   help="decode with one compiled step (CUDA graph) over a static cache; default: on CUDA only")
    cfg = EvalConfig(**vars(p.parse_args(argv)))

    # check every path before the first (slow) checkpoint runs
    try:
        for path in cfg.init:
            check_checkpoint(path)
        sets = []
        if cfg.data:
            sets.append((os.path.splitext(os.path.basename(cfg.data))[0], load_rows(cfg.data)))
        if cfg.gsm8k:
            sets.append(("gsm8k", load_gsm8k(cfg.gsm8k)))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"eval.py: {e}")
    if not sets:
        sys.exit("eval.py: nothing to evaluate (give --data and/or --gsm8k)")
    if cfg.limit:
        sets = [(name, rows[:cfg.limit]) for name, rows in sets]

    names = [os.path.basename(os.path.normpath(x)) for x in cfg.init]
    results = []
    for path, name in zip(cfg.init, names):
        if names.count(name) > 1:
            name = path  # two checkpoints with one basename: show the paths
        try:
            model, tok = load_checkpoint(path, cfg.device)
        except (FileNotFoundError, RuntimeError, ValueError) as e:
            sys.exit(f"eval.py: {e}")
        for data_name, rows in sets:
            print(f"{name}: {data_name} ({len(rows)} rows)")
            res = evaluate(model, tok, rows, cfg.max_new_tokens, cfg.batch_size, progress=True,
                           compile_decode=cfg.compile_decode)
            results.append(dict(name=name, checkpoint=path, data=data_name, **res))
        del model
    print_table(results)
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump({"config": asdict(cfg), "results": results}, f, indent=1)
        print(f"wrote {cfg.out}")
    return results


if __name__ == "__main__":
    main()
