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
import sys

import torch

from convert_gguf import DEFAULT_OUT as DEFAULT_INIT, ensure_default
from model import Transformer, decoding_dtype, pick_device, resolve_checkpoint
from tokenizer import Tokenizer



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default=DEFAULT_INIT, help="checkpoint directory or hub id")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template, print only the answer")
    ap.add_argument("--max_new_tokens", type=int, default=200)
    ap.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    ap.add_argument("--top_k", type=int, default=None)
    ap.add_argument("--top_p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu")
    ap.add_argument("--compile_decode", action=argparse.BooleanOptionalAction, default=None,
                    help="one compiled decoding step (CUDA graph) over a static cache; default: on CUDA only")
    args = ap.parse_args(argv)

    try:
        device = pick_device(args.device)
        path = resolve_checkpoint(ensure_default(args.init))
        tok = Tokenizer.from_pretrained(path)
        model = Transformer.from_pretrained(path, dtype=decoding_dtype(device), device=device)
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"error: {e}")
    if args.chat:
        ids, _ = tok.encode_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(args.prompt)
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
    main()
