"""
Sample from a checkpoint: a downloaded model, a hub id, or a train.py output directory.

    python sample.py --prompt "The capital of France is"
    python sample.py --chat --prompt "What is the capital of France?" --temperature 0
    python sample.py --init out --chat --prompt "Start with 12. Add 5, then multiply by 3. What is the result?"

Prints the continuation as it decodes (KV cache: the prompt is processed once, then one token per step).
On CUDA each step runs as one compiled CUDA graph over a static cache (decode.py): the first call pays for the
compilation; --no-compile_decode decodes eagerly (the default on a CPU, where compiling does not pay).
"""
import argparse
import math
import os
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle threads sleep, not spin (docs/performance.md)

import torch

import errors
from convert_gguf import DEFAULT_OUT as DEFAULT_INIT, ensure_default
from hf_checkpoint import read_config
from model import ModelConfig, Transformer, decoding_dtype, pick_device, resolve_checkpoint
from tokenizer import Tokenizer


def main(argv=None):
    ap = errors.ArgumentParser(description=__doc__, formatter_class=errors.HelpFormatter)
    ap.add_argument("--init", default=DEFAULT_INIT, help="checkpoint directory or hub id ('org/name')")
    ap.add_argument("--prompt", default="The capital of France is", help="the text to continue (not empty)")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template, print only the answer")
    ap.add_argument("--max_new_tokens", type=int, default=200,
                    help="tokens to generate at most (>= 0; the prompt plus these must fit the model's context)")
    ap.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, >= 0; 0 = greedy")
    ap.add_argument("--top_k", type=int, default=None, help="sample among the k likeliest tokens only (>= 1); "
                                                            "None: all")
    ap.add_argument("--top_p", type=float, default=None, help="nucleus sampling: the smallest set of tokens whose "
                                                              "probability reaches p, in (0, 1]; None: all")
    ap.add_argument("--seed", type=int, default=1337, help="seed of the sampling generator")
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda[:N] or cpu")
    ap.add_argument("--compile_decode", action=argparse.BooleanOptionalAction, default=None,
                    help="one compiled decoding step (CUDA graph) over a static cache; None: on CUDA only")
    args = ap.parse_args(argv)

    # every flag, then the checkpoint's context, before the model loads
    if args.max_new_tokens < 0:
        ap.error(f"--max_new_tokens {args.max_new_tokens}: must be >= 0")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        ap.error(f"--temperature {args.temperature}: must be a finite number >= 0 (0: greedy)")
    if args.top_k is not None and args.top_k < 1:
        ap.error(f"--top_k {args.top_k}: must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # nan fails this too
        ap.error(f"--top_p {args.top_p}: must be in (0, 1]")
    if not args.prompt:
        ap.error("--prompt: empty; give the text to continue")
    device = pick_device(args.device)
    path = resolve_checkpoint(ensure_default(args.init))
    context = ModelConfig.from_hf(read_config(path), f"{path}/config.json").max_position_embeddings
    if args.max_new_tokens >= context:
        ap.error(f"--max_new_tokens {args.max_new_tokens} is beyond the context of {path} ({context} positions, "
                 "max_position_embeddings in its config.json)")
    tok = Tokenizer.from_pretrained(path)
    if args.chat:
        ids, _ = tok.encode_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(args.prompt)
    if len(ids) + args.max_new_tokens > context:  # refused: positions past the context decode garbage
        ap.error(f"the prompt ({len(ids)} tokens) and --max_new_tokens {args.max_new_tokens} do not fit the context "
                 f"of {path} ({context} positions); give at most --max_new_tokens {max(context - len(ids), 0)}")
    model = Transformer.from_pretrained(path, dtype=decoding_dtype(device), device=device)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    new, shown = [], ""
    for tok_id in model.stream(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                               eos_ids=tok.eos_ids, generator=gen, compile=args.compile_decode):
        t = int(tok_id[0, 0])
        if t in tok.eos_ids:
            break
        new.append(t)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # hold back a character whose bytes are not all out yet
            print(text[len(shown):], end="", flush=True)
            shown = text
    print()


if __name__ == "__main__":
    errors.run(main)
