"""
Hugging Face checkpoints in and out: config.json read by rule, safetensors read into a model's parameters
(under FSDP each rank reads only the rows it keeps), and written back in the layout that transformers, vLLM and
lm-evaluation-harness load.

Every config.json key is one of three kinds:
- inert: it cannot change the forward pass (metadata "_*", any "*_token_id", tool sections with a dot in the
  name such as "transformers.js_config", generation and serving knobs). Accepted without a word, kept for saving.
- math: read into ModelConfig and checked by value. Values model.py implements load; any other value stops
  with a message naming the key and the value.
- unknown: anything else. It loads with one warning naming it and is kept for saving; never silently dropped.
What transformers 5.x reads for each family (Llama, Mistral, Qwen2) decides which keys are math.
"""
import json
import math
import os
import re
import warnings

import torch

from errors import BadValue, NotFound, file_error, read_json

ARCHITECTURES = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "tekken.json", "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")

# keys that cannot change the forward pass, whatever their value
INERT = {
    # bookkeeping transformers writes (its PretrainedConfig attributes) and other tools add
    "architectures", "torch_dtype", "dtype", "transformers_version", "use_cache", "initializer_range",
    "attn_implementation", "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id",
    "problem_type", "tokenizer_class", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "finetuning_task", "prefix",
    "task_specific_params", "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder",
    "keys_to_ignore_at_inference", "is_llama_config", "unsloth_fixed", "unsloth_version",
    # generation defaults that transformers 4 wrote into config.json
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
    # training only (dropout: this repo trains without), or not read by transformers 5 (tensor-parallel slicing)
    "attention_dropout", "pretraining_tp",
}
# keys transformers does not read for one family: inert there (Qwen2 always has q/k/v biases)
INERT_FOR = {"llama": {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"},
             "mistral": {"use_sliding_window", "max_window_layers", "layer_types"},
             "qwen2": {"attention_bias"}}
# keys written again by config_to_hf rather than carried over
REWRITTEN = {"architectures", "torch_dtype", "dtype", "transformers_version"}


def is_inert(key: str, model_type: str) -> bool:
    return (key.startswith("_") or key.endswith(("_token_id", "_token_ids")) or "." in key or key in INERT
            or key in INERT_FOR[model_type])


def config_kwargs(hf: dict, source: str = "config.json") -> dict:
    """ModelConfig's fields from a transformers config.json dict (4.x or 5.x style); errors name source."""
    if not isinstance(hf, dict):
        raise BadValue(f"{source}: the top level must be an object {{...}}, not {type(hf).__name__}")
    hf = dict(hf)
    mt = hf.pop("model_type", None)
    if mt not in ARCHITECTURES:
        raise BadValue(f"{source}: model_type {mt!r} is not supported (supported: {', '.join(ARCHITECTURES)})")

    def take(key, default=KeyError, kind=None):
        """hf[key] (or default), checked to be a kind: "size" (a positive integer), "positive" (a finite
        number > 0), "bool", "dict" or "list"; None (JSON null) passes where the default is None."""
        if key not in hf and default is KeyError:
            raise BadValue(f"{source}: lacks {key!r}")
        value = hf.pop(key, default)
        if kind is not None and not (value is None and default is None):
            check(key, value, kind)
        return value

    def check(key, value, kind):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {"size": number and isinstance(value, int) and value > 0,
              "positive": number and math.isfinite(value) and value > 0,
              "bool": isinstance(value, bool), "dict": isinstance(value, dict),
              "list": isinstance(value, list)}[kind]
        if not ok:
            want = {"size": "a positive integer", "positive": "a positive number", "bool": "true or false",
                    "dict": "an object {...}", "list": "a list [...]"}[kind]
            raise BadValue(f"{source}: {key}={value!r} must be {want}")

    def refuse(key, value, what):
        raise BadValue(f"{source}: {key}={value!r} is not supported ({what})")

    # values that change the math, and the only ones model.py implements
    if (act := take("hidden_act", "silu")) not in ("silu", "swish"):
        refuse("hidden_act", act, "only silu: the SwiGLU MLP")
    for key, ok, what in [("mlp_bias", False, "no MLP biases"), ("rope_interleaved", False, "HF's rotate_half pairs"),
                          ("partial_rotary_factor", 1.0, "RoPE on the whole head"),
                          ("quantization_config", None, "dequantize the checkpoint first"),
                          ("use_mrope", False, "1-D RoPE; Qwen2.5 base configs carry use_mrope false")]:
        if (value := take(key, ok)) != ok:
            refuse(key, value, what)
    if mt != "qwen2" and (bias := take("attention_bias", False)):
        refuse("attention_bias", bias, "no attention biases on llama or mistral")

    # rotary embeddings: transformers 5 writes rope_parameters (with rope_theta inside), 4.x rope_theta + rope_scaling
    rope_key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = dict(take(rope_key, None, "dict") or {})
    hf.pop("rope_scaling", None)
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if (factor := rope.pop("partial_rotary_factor", 1.0)) != 1.0:
        refuse(f"{rope_key} partial_rotary_factor", factor, "RoPE on the whole head")
    top_theta = take("rope_theta", None, "positive")  # transformers 5 prefers the one inside the rope dict
    theta = rope.pop("rope_theta", None) or top_theta or 10000.0
    check(f"{rope_key} rope_theta", theta, "positive")
    max_pos = take("max_position_embeddings", {"llama": 2048, "mistral": 131072, "qwen2": 32768}[mt], "size")
    original_max = take("original_max_position_embeddings", None, "size")  # Phi-3 style, outside the rope dict
    scaling = None
    if rope_type == "llama3":
        rope.setdefault("original_max_position_embeddings", original_max or max_pos)
        need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if any(k not in rope for k in need):
            raise BadValue(f"{source}: llama3 rope scaling needs {need}, got {sorted(rope)}")
        for k in need:
            check(f"{rope_key} {k}", rope[k], "positive")
        scaling = dict({k: rope[k] for k in need}, rope_type="llama3")
    elif rope_type != "default":
        refuse(f"{rope_key} rope_type", rope_type, "only default and llama3")

    # attention: grouped heads, head size, windows
    n_heads, dim = take("num_attention_heads", kind="size"), take("hidden_size", kind="size")
    # a missing num_key_value_heads means what transformers' class default means
    n_kv = take("num_key_value_heads", None, "size") or {"llama": n_heads, "mistral": 8, "qwen2": 32}[mt]
    head_dim = take("head_dim", None)
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int)):
        check("head_dim", head_dim, "size")
    if head_dim is None and dim % n_heads:
        raise BadValue(f"{source}: hidden_size {dim} is not a multiple of num_attention_heads {n_heads}; "
                       "give head_dim")
    head_dim = head_dim or dim // n_heads
    if head_dim <= 0 or head_dim % 2 or n_heads % n_kv:
        raise BadValue(f"{source}: head_dim={head_dim} must be even and positive, and num_attention_heads "
                       f"({n_heads}) a multiple of num_key_value_heads ({n_kv})")
    n_layers = take("num_hidden_layers", kind="size")
    window, window_layers = None, None
    if mt == "mistral":
        window = take("sliding_window", 4096)  # absent means MistralConfig's default, as in transformers
        if window is not None:
            check("sliding_window", window, "size")
    elif mt == "qwen2":  # the window applies only when asked, and then on the layers layer_types names
        use, size = take("use_sliding_window", False, "bool"), take("sliding_window", 4096)
        n_full, layer_types = take("max_window_layers", 28), take("layer_types", None, "list")
        if use:
            check("sliding_window", size, "size")
            check("max_window_layers", n_full, "size")
        window = size if use else None
        if window is not None:  # no layer_types: transformers' rule, the first max_window_layers attend fully
            layer_types = layer_types or ["sliding_attention" if i >= n_full else "full_attention"
                                          for i in range(n_layers)]
            if len(layer_types) != n_layers or not set(layer_types) <= {"sliding_attention", "full_attention"}:
                refuse("layer_types", layer_types, "one of sliding_attention / full_attention per layer")
            window_layers = [t == "sliding_attention" for t in layer_types]
    kw = dict(vocab_size=take("vocab_size", kind="size"), dim=dim, n_layers=n_layers, n_heads=n_heads,
              n_kv_heads=n_kv, head_dim=head_dim, intermediate_size=take("intermediate_size", kind="size"),
              rms_norm_eps=take("rms_norm_eps", 1e-6, "positive"), rope_theta=float(theta), rope_scaling=scaling,
              max_position_embeddings=max_pos, sliding_window=window, window_layers=window_layers,
              qkv_bias=mt == "qwen2", tie_word_embeddings=take("tie_word_embeddings", False, "bool"), model_type=mt)
    unknown = sorted(k for k in hf if not is_inert(k, mt))
    if unknown:
        warnings.warn(f"{source}: keys {unknown} are not known to model.py and are ignored; if one of them changes "
                      "the model's math, its outputs will differ from transformers'")
    kw["extra"] = {k: v for k, v in hf.items() if not k.startswith("_") and k not in REWRITTEN}
    return kw


def config_to_hf(cfg) -> dict:
    """The config.json that transformers (and so vLLM, lm-evaluation-harness) reads."""
    hf = dict(cfg.extra, architectures=[ARCHITECTURES[cfg.model_type]], model_type=cfg.model_type,
              vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
              intermediate_size=cfg.intermediate_size, hidden_act="silu", rms_norm_eps=cfg.rms_norm_eps,
              rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
              max_position_embeddings=cfg.max_position_embeddings,
              sliding_window=cfg.sliding_window, tie_word_embeddings=cfg.tie_word_embeddings)
    if cfg.model_type == "qwen2":
        hf["use_sliding_window"] = cfg.sliding_window is not None
        if cfg.window_layers is not None:
            hf["layer_types"] = ["sliding_attention" if w else "full_attention" for w in cfg.window_layers]
    elif cfg.model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
        hf.pop("sliding_window")
    return hf


# ---------------------------------------------------------------------------------------------------------------
# safetensors in


def resolve_checkpoint(path: str) -> str:
    """A local directory as-is; otherwise a hub id, downloaded (or found in the cache) with huggingface_hub."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") != 1:
        raise NotFound(f"{path!r} is not a checkpoint directory (nor a hub id like 'org/name')")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"])
    except Exception as e:
        raise NotFound(f"could not download {path!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
                                "when offline, pass a local checkpoint directory") from e


def read_config(path: str) -> dict:
    """config.json of a checkpoint directory (of an adapter directory: its base's); one UserError naming the file
    when it is missing or not JSON."""
    if is_adapter(path):
        base = read_json(os.path.join(path, "adapter_config.json")).get("base_model_name_or_path")
        if isinstance(base, str) and base:
            return read_json(os.path.join(resolve_checkpoint(base), "config.json"))
    return read_json(os.path.join(path, "config.json"))


def safetensors_error(path: str, e: Exception) -> Exception:
    """A safetensors reader's exception as one line naming the file (a truncated file, a garbage header)."""
    if os.path.isdir(path):
        return BadValue(f"{path}: is a directory, not a safetensors file")
    return file_error(path, e, "not a readable safetensors file (truncated or corrupt?)")


def weight_files(path: str) -> dict:
    """{HF tensor name: safetensors file} of a checkpoint directory, single file or sharded with an index."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise BadValue(f"{index}: 'weight_map' must be an object {{tensor name: file name}}")
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise NotFound(f"{path} has no model.safetensors or model.safetensors.index.json")
    try:
        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    except Exception as e:
        raise safetensors_error(single, e) from None


def stored_shapes(files: dict) -> dict:
    """{tensor name: shape} from the files' headers (no tensor data is read)."""
    from safetensors import safe_open
    shapes = {}
    for file in sorted(set(files.values())):
        try:
            with safe_open(file, framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if files.get(k) == file})
        except Exception as e:
            raise safetensors_error(file, e) from None
    if missing := sorted(set(files) - set(shapes)):
        raise BadValue(f"{files[missing[0]]}: has no tensor {missing[0]!r}, which the index names")
    return shapes


def check_layers(cfg, files: dict, source: str):
    """Before any model is built: config.json's num_hidden_layers must be the number of layers the weights hold
    (an absurd value would otherwise build millions of layers)."""
    held = {int(m.group(1)) for k in files if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if len(held) != cfg.n_layers:
        raise BadValue(f"{source}: num_hidden_layers={cfg.n_layers}, but the weights hold {len(held)} layers")


SHAPE_HINT = " by config.json (check hidden_size, head_dim, num_key_value_heads, intermediate_size, vocab_size)"


def check_shapes(model, files: dict, source: str = "config.json"):
    """Every parameter of a (meta) model against the shape its file stores, before any memory is allocated: a
    config (source) whose sizes contradict the weights, absurd ones included, stops here naming the tensor."""
    hint = SHAPE_HINT.replace("config.json", source)
    shapes = stored_shapes(files)
    for key, p in model.state_dict(keep_vars=True).items():
        name = hf_name(key)
        if name in shapes and shapes[name] != tuple(p.shape):
            raise BadValue(f"{files[name]}: {name} has shape {shapes[name]}, expected {tuple(p.shape)}{hint}")


def stored_dtype(files: dict) -> torch.dtype:
    """The dtype the checkpoint stores its embedding table in (the model keeps it when no dtype is asked for)."""
    from safetensors import safe_open
    name = next((k for k in files if k.endswith("embed_tokens.weight")), None)
    if name is None:
        raise BadValue(f"{sorted(set(files.values()))[0] if files else 'the checkpoint'}: holds no "
                       "model.embed_tokens.weight")
    try:
        with safe_open(files[name], framework="pt") as f:
            return f.get_slice(name)[:1].dtype
    except Exception as e:
        raise safetensors_error(files[name], e) from None


def hf_name(key: str) -> str:
    # our module tree mirrors HF's below the "model." prefix, so the key map is one rule
    return key if key.startswith("lm_head") else "model." + key


def own_rows(p: torch.Tensor) -> slice:
    """The rows of a parameter (or of state shaped like it) this process holds: all of them, or under FSDP2 (a
    DTensor sharded on dim 0) its own block of torch.chunk's split, ceil(rows / world) per rank."""
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(p, DTensor):
        return slice(None)
    assert tuple(p.placements) == (Shard(0),), f"expected FSDP's row sharding, got {p.placements}"
    n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    per = -(-n // world)
    return slice(min(rank * per, n), min((rank + 1) * per, n))


def local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


@torch.no_grad()
def read_into(targets: dict, files: dict, hint: str = ""):
    """Copy each named tensor of a safetensors file into targets[name], in place. A DTensor (FSDP) gets only the
    rows this rank keeps, and only those rows are read. The file is opened per tensor, so the pages read for one
    tensor are unmapped before the next: no more than one tensor's rows are mapped at a time."""
    from safetensors import safe_open
    for name, t in targets.items():
        rows = own_rows(t)
        try:
            with safe_open(files[name], framework="pt") as f:
                stored = f.get_slice(name)
                if tuple(stored.get_shape()) != tuple(t.shape):
                    raise BadValue(f"{files[name]}: {name} has shape {tuple(stored.get_shape())}, expected "
                                   f"{tuple(t.shape)}{hint}")
                value = f.get_tensor(name) if rows == slice(None) else stored[rows]
        except BadValue:
            raise
        except Exception as e:
            raise safetensors_error(files[name], e) from None
        local(t).copy_(value)


def load_weights(model, path: str, files: dict):
    """Fill the (already allocated) parameters of model from the checkpoint at path: one copy of the weights in
    memory, and under FSDP only this rank's rows of each tensor are read."""
    cfg = model.config
    params = {hf_name(k): p for k, p in model.state_dict(keep_vars=True).items()
              if not (cfg.tie_word_embeddings and k == "lm_head.weight") and ".lora_" not in k}  # adapters: lora.py
    for name in files:
        if name not in params and not (name == "lm_head.weight" or name.endswith("rotary_emb.inv_freq")):
            raise BadValue(f"{files[name]}: unexpected tensor {name!r} (not part of a {cfg.model_type} model)")
    missing = sorted(set(params) - set(files))
    if missing:
        raise BadValue(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    read_into(params, files, SHAPE_HINT)


# ---------------------------------------------------------------------------------------------------------------
# safetensors out


def save(cfg, state_dict: dict, out_dir: str, max_shard_bytes: int, tokenizer_dir: str | None):
    """Write config.json + safetensors with HF tensor names (sharded above max_shard_bytes), and copy the
    tokenizer files of tokenizer_dir."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    sd = {hf_name(k): v.detach().contiguous().cpu() for k, v in state_dict.items()
          if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    shards, size = [{}], 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if size + nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    dtype = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(config_to_hf(cfg), torch_dtype=dtype), f, indent=2)
    if tokenizer_dir:
        copy_tokenizer(tokenizer_dir, out_dir)


def is_adapter(path: str) -> bool:
    """A folder of LoRA adapter files (peft's adapter_config.json) rather than a model (config.json)."""
    return os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(
        os.path.join(path, "config.json"))


def copy_tokenizer(tokenizer_dir: str, out_dir: str):
    """The tokenizer files of tokenizer_dir (those it has) into out_dir."""
    import shutil
    for name in TOKENIZER_FILES:
        src = os.path.join(tokenizer_dir, name)
        if os.path.exists(src) and os.path.abspath(tokenizer_dir) != os.path.abspath(out_dir):
            shutil.copy(src, os.path.join(out_dir, name))
