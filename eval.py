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
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle threads sleep, not spin (docs/performance.md)
import re
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

import errors
import ift
from data import collate, to_messages
import hf_checkpoint
from errors import BadValue, NotFound, UserError, json_lines, read_text
from hf_checkpoint import read_config
from model import ModelConfig, Transformer, decoding_dtype, pick_device
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
    """The objects of a JSON-lines file; every problem is one UserError naming the file and line."""
    if os.path.isdir(path):
        raise BadValue(f"data file {path!r} is a directory")
    if not os.path.isfile(path):
        raise NotFound(f"data file {path!r} does not exist")
    rows = json_lines(read_text(path), path)  # read_text: bytes not UTF-8 named by line
    if not rows:
        raise BadValue(f"data file {path!r} has no rows")
    return rows


def load_rows(path: str) -> list:
    """Chat rows {"messages": [..., {"role": "assistant", ...}], "answer": str}."""
    rows = read_jsonl(path)
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict) or not isinstance(r.get("messages"), list) or not isinstance(r.get("answer"), str):
            raise BadValue(f"{path}: row {n}: want messages ending in an assistant turn, and an answer (a string)")
        to_messages({"messages": r["messages"]}, f"{path}: row {n}")  # roles, contents, the assistant turn last
    return rows


def load_gsm8k(path: str) -> list:
    """GSM8K rows {"question", "answer": "... #### 42"} as chat rows: the question is the user turn."""
    rows = []
    for n, r in enumerate(read_jsonl(path), 1):
        if not (isinstance(r, dict) and isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)
                and "####" in r["answer"]):
            raise BadValue(f"{path}: row {n} is not a GSM8K row (question, answer with '#### ')")
        msgs = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        rows.append(dict(messages=msgs, answer=extract_answer(r["answer"])))
    return rows


def check_context(path: str, sets: list, max_new_tokens: int):
    """Before any model loads: with checkpoint path's tokenizer, every row of sets [(name, rows, file)] must fit
    the model's context (max_position_embeddings), its prompt plus max_new_tokens and its whole conversation
    alike; a row that does not is refused, named (positions past the context give garbage, not an answer). The
    chat template's errors stop here too, with the row."""
    context = ModelConfig.from_hf(read_config(path), os.path.join(path, "config.json")).max_position_embeddings
    tok = Tokenizer.from_pretrained(path)
    for _, rows, file in sets:
        for n, r in enumerate(rows, 1):
            try:
                prompt = len(tok.encode_chat(r["messages"][:-1], add_generation_prompt=True)[0])
                whole = len(tok.encode_chat(r["messages"])[0])
            except UserError as e:
                raise BadValue(f"{file}: row {n}: {e}") from None
            if max(prompt + max_new_tokens, whole) > context:
                raise BadValue(f"{file}: row {n}: {prompt} prompt tokens + --max_new_tokens {max_new_tokens} "
                               f"(or its {whole} tokens with the answer) do not fit the context of {path} "
                               f"({context} positions); lower --max_new_tokens or drop the row")


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
    # closed (its line ended) also when stopped: an error or "interrupted" then has a line of its own
    with tqdm(total=len(prompts), desc="generate", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            b = order[start:start + batch_size]
            T = max(len(prompts[i]) for i in b)
            pad = torch.tensor([T - len(prompts[i]) for i in b], device=device)
            idx = torch.tensor([[0] * (T - len(prompts[i])) + list(prompts[i]) for i in b], device=device)
            new = model.generate(idx, max_new_tokens, temperature=0, eos_ids=tok.eos_ids, pad=pad,
                                 compile=compile)[:, T:]
            for i, ids in zip(b, new.tolist()):
                end = next((k for k, t in enumerate(ids) if t in eos), len(ids))
                texts[i] = tok.decode(ids[:end])
            bar.update(len(b))
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
    with tqdm(batches, desc="loss", disable=not progress) as bar:  # closed also when stopped (see generate_texts)
        for b in bar:
            for i in b:
                if not any(encoded[i][1][1:]):
                    raise BadValue(f"row {i + 1}: no answer tokens to score (an empty answer the chat template "
                                   "drops?)")
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
        raise NotFound(f"checkpoint directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")) and not hf_checkpoint.is_adapter(path):
        raise NotFound(f"checkpoint directory {path!r} has no config.json (not an HF checkpoint) nor "
                       "adapter_config.json (LoRA adapters)")


def load_checkpoint(path: str, device: str = "auto"):
    """(model, tokenizer) from an HF checkpoint directory. A problem with its files is the readers' one line
    (errors.UserError, naming the file); anything else is re-raised naming the directory. The device by the
    scripts' rule (model.pick_device), weights in model.decoding_dtype (bf16 on CUDA, float32 on CPU)."""
    check_checkpoint(path)
    dev = pick_device(device)
    try:
        model = Transformer.from_pretrained(path, dtype=decoding_dtype(dev), device=dev)
        tok = Tokenizer.from_pretrained(path)
    except UserError:
        raise
    except Exception as e:
        raise RuntimeError(f"cannot load checkpoint {path!r}: {type(e).__name__}: {e}") from e
    return model, tok


def print_table(results: list):
    print(f"{'checkpoint':<32} {'data':<14} {'exact%':>7} {'loss':>7} {'n':>5} {'sec':>7}")
    for r in results:
        em = f"{r['exact_match']:.1f}" if "exact_match" in r else "-"
        loss = f"{r['loss']:.4f}" if "loss" in r else "-"
        print(f"{r['name'][-32:]:<32} {r['data']:<14} {em:>7} {loss:>7} {r['n']:>5} {r['seconds']:>7.1f}")


def out_file_problem(path: str) -> str | None:
    """Why a JSON result could not be written to path (checked before the work), or None."""
    folder = os.path.dirname(path) or "."
    if os.path.isdir(path):
        return f"{path} is a directory; give a file name"
    if not os.path.isdir(folder):
        return f"{path}: the folder {folder} does not exist"
    if not os.access(folder, os.W_OK):
        return f"{path}: the folder {folder} is not writable"
    return None


def write_json(path: str, obj):
    """Written whole, then renamed into place: an interrupted write never leaves half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    d = EvalConfig()
    p = errors.ArgumentParser(description=__doc__, formatter_class=errors.HelpFormatter)
    p.add_argument("--init", nargs="+", action="extend", required=True,
                   help="checkpoint directories (train.py outputs or a base model); repeatable")
    p.add_argument("--data", default=d.data, help="chat-row JSONL ('' to skip)")
    p.add_argument("--gsm8k", default=d.gsm8k, help="GSM8K-schema JSONL (question, answer '... #### 42'); '' to skip")
    p.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens,
                   help="greedy tokens generated per prompt (>= 0; the prompt plus these must fit the model's "
                        "context)")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="prompts per batch (>= 1)")
    p.add_argument("--limit", type=int, default=d.limit, help="first N rows of each data set (0: all)")
    p.add_argument("--out", default=d.out, help="write metrics and per-example predictions to this JSON file "
                                                "(its folder must exist); '' for none")
    p.add_argument("--device", default=d.device, help="auto (cuda when there is one), cuda[:N] (bf16 weights) or cpu")
    p.add_argument("--compile_decode", action=argparse.BooleanOptionalAction, default=d.compile_decode,
                   help="decode with one compiled step (CUDA graph) over a static cache; None: on CUDA only")
    cfg = EvalConfig(**vars(p.parse_args(argv)))

    # flags, then files, then every row against each model's context: all before the first (slow) checkpoint loads
    if cfg.max_new_tokens < 0:
        p.error(f"--max_new_tokens {cfg.max_new_tokens}: must be >= 0")
    if cfg.batch_size < 1:
        p.error(f"--batch_size {cfg.batch_size}: must be >= 1")
    if cfg.limit < 0:
        p.error(f"--limit {cfg.limit}: must be >= 0 (0: all rows)")
    if cfg.out and (why := out_file_problem(cfg.out)):
        p.error(f"--out {why}")
    if not cfg.data and not cfg.gsm8k:
        p.error("nothing to evaluate (give --data and/or --gsm8k)")
    pick_device(cfg.device)
    for path in cfg.init:
        check_checkpoint(path)
    sets = []
    if cfg.data:
        sets.append((os.path.splitext(os.path.basename(cfg.data))[0], load_rows(cfg.data), cfg.data))
    if cfg.gsm8k:
        sets.append(("gsm8k", load_gsm8k(cfg.gsm8k), cfg.gsm8k))
    if cfg.limit:
        sets = [(name, rows[:cfg.limit], file) for name, rows, file in sets]
    for path in cfg.init:
        context = ModelConfig.from_hf(read_config(path), os.path.join(path, "config.json")).max_position_embeddings
        if cfg.max_new_tokens >= context:
            p.error(f"--max_new_tokens {cfg.max_new_tokens} is beyond the context of {path} ({context} positions, "
                    "max_position_embeddings in its config.json)")
        check_context(path, sets, cfg.max_new_tokens)

    names = [os.path.basename(os.path.normpath(x)) for x in cfg.init]
    results = []
    for path, name in zip(cfg.init, names):
        if names.count(name) > 1:
            name = path  # two checkpoints with one basename: show the paths
        model, tok = load_checkpoint(path, cfg.device)
        for data_name, rows, _ in sets:
            print(f"{name}: {data_name} ({len(rows)} rows)")
            res = evaluate(model, tok, rows, cfg.max_new_tokens, cfg.batch_size, progress=True,
                           compile_decode=cfg.compile_decode)
            results.append(dict(name=name, checkpoint=path, data=data_name, **res))
        del model
    print_table(results)
    if cfg.out:
        write_json(cfg.out, {"config": asdict(cfg), "results": results})
        print(f"wrote {cfg.out}")
    return results


if __name__ == "__main__":
    errors.run(main)
