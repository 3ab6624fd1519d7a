"""lora.py against peft 0.21 (the reference): logits with the same adapters, each side loading the other's saved
adapter, merging into a plain checkpoint transformers loads; freezing, the off switch, and refusals."""
import json
import os

import pytest
import torch
import torch.nn as nn

import lora
from errors import BadValue, NotFound, UserError
from lora import TARGETS, Settings, adapter_state_dict, add_adapters, disabled, load_adapter, merge_adapters
from model import ModelConfig, Transformer

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, rms_norm_eps=1e-5)
KINDS = {"llama": {}, "mistral": dict(sliding_window=6), "qwen2": {}}  # window 6 < the 12 positions tested
IDX = torch.arange(24).remainder(TINY["vocab_size"]).mul(37).remainder(TINY["vocab_size"]).view(2, 12)


def make_hf(kind: str, path) -> str:
    """A tiny random transformers model of a family, saved to path (Qwen2 with nonzero q/k/v biases)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)
    cfg_cls, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                    "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    torch.manual_seed(0)
    model = cls(cfg_cls(**TINY, **KINDS[kind]))
    if kind == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    m.bias.normal_(std=0.5)
    model.save_pretrained(path)
    return str(path)


def load_hf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def randomize(named_params, seed=1, std=0.2):
    """Every lora_B (zero at init) random, so that the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def logits(model, idx=IDX):
    with torch.no_grad():
        out = model(idx)
    return getattr(out, "logits", out)


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48, qkv_bias=True,
               tie_word_embeddings=True, model_type="qwen2")
    return Transformer(ModelConfig(**dict(cfg, **kw))).eval()


def check_peft_loads_ours(ours, base_dir, adapter_dir, r, alpha, idx=IDX):
    """save_adapter's output loaded by peft: the same tensors under the same names, the same logits."""
    from peft import PeftModel
    lora.save_adapter(ours, adapter_dir, base_dir)
    peft_model = PeftModel.from_pretrained(load_hf(base_dir), adapter_dir).eval()
    config = peft_model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.base_model_name_or_path) == (r, alpha, base_dir)
    theirs = {k.replace(".default.", "."): v for k, v in peft_model.state_dict().items() if ".lora_" in k}
    mine = adapter_state_dict(ours)
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)
    diff = (logits(ours, idx) - logits(peft_model, idx)).abs().max().item()
    assert diff <= 1e-5, f"max |logits - peft's| {diff}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_our_adapter_loads_in_peft_with_our_logits(kind, tmp_path):
    base_dir = make_hf(kind, tmp_path / "base")
    ours = Transformer.from_pretrained(base_dir)
    base = logits(ours)
    add_adapters(ours, r=4, alpha=6, dropout=0.1, targets=TARGETS)
    randomize(ours.named_parameters())
    assert (logits(ours) - base).abs().max() > 1e-2  # the adapters matter
    check_peft_loads_ours(ours, base_dir, str(tmp_path / "adapter"), r=4, alpha=6)


def test_smollm2_adapter_in_peft(smollm2_dir, tmp_path):
    ours = Transformer.from_pretrained(smollm2_dir, torch.float32)
    idx = IDX[:1, :6] + 1000  # short: 30 layers, a 49152-word vocabulary
    base = logits(ours, idx)
    add_adapters(ours, r=2, alpha=4, targets=("q_proj", "v_proj", "down_proj"))
    randomize(ours.named_parameters(), std=0.05)
    assert (logits(ours, idx) - base).abs().max() > 1e-2
    check_peft_loads_ours(ours, smollm2_dir, str(tmp_path / "adapter"), r=2, alpha=4, idx=idx)


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_adapter_saved_by_peft_loads_with_peft_logits(kind, tmp_path):
    from peft import LoraConfig, get_peft_model
    base_dir = make_hf(kind, tmp_path / "base")
    targets = ["v_proj", "q_proj", "down_proj"]
    # peft's defaults: lora_alpha 8, init_lora_weights True; r 4 -> scale 2
    peft_model = get_peft_model(load_hf(base_dir), LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    randomize(peft_model.named_parameters())
    peft_model.save_pretrained(tmp_path / "adapter")
    settings, base_path = lora.read_adapter_config(str(tmp_path / "adapter"))
    assert base_path == base_dir
    ours = Transformer.from_pretrained(base_dir)
    assert load_adapter(ours, str(tmp_path / "adapter")) == settings == Settings(4, 8, 0.0, ("q_proj", "v_proj",
                                                                                          "down_proj"))
    assert lora.settings(ours) == settings
    assert isinstance(ours.layers[1].mlp.down_proj, lora.LoRALinear)
    assert type(ours.layers[1].mlp.up_proj) is nn.Linear
    diff = (logits(ours) - logits(peft_model.eval())).abs().max().item()
    assert diff <= 1e-5, f"max |logits - peft's| {diff}"


def test_merged_checkpoint_loads_in_transformers_as_plain_model(tmp_path):
    base_dir = make_hf("qwen2", tmp_path / "base")
    ours = Transformer.from_pretrained(base_dir)
    plain_keys = set(ours.state_dict())
    add_adapters(ours, r=4, alpha=8)
    randomize(ours.named_parameters())
    adapted = logits(ours)
    assert merge_adapters(ours) is ours
    assert not lora.adapters(ours) and set(ours.state_dict()) == plain_keys
    assert all(type(m) is nn.Linear for m in ours.modules() if isinstance(m, nn.Linear))
    ours.save_pretrained(str(tmp_path / "merged"))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
    diff = (logits(load_hf(str(tmp_path / "merged"))) - adapted).abs().max().item()
    assert diff <= 1e-5, f"max |merged logits in transformers - adapted logits| {diff}"


def test_only_adapters_train_and_start_as_the_base():
    m = tiny()
    idx = IDX % 64
    base = logits(m, idx)
    old = m.layers[0].self_attn.q_proj.weight
    r = 3
    add_adapters(m, r=r, alpha=6)
    assert m.layers[0].self_attn.q_proj.weight is old  # taken over, not copied
    assert torch.equal(logits(m, idx), base)  # B = 0: the output is exactly the base's
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in trainable)
    assert len(trainable) == 2 * len(TARGETS) * m.config.n_layers
    # memory: the trainable parameters (fp32 masters, gradients, optimizer state) are r * (in + out) per target
    c = m.config
    q, kv, d, inter = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.dim, c.intermediate_size
    per_layer = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + inter) + (inter + d)  # q k v o gate up down
    assert sum(p.numel() for p in trainable.values()) == r * per_layer * c.n_layers
    m.train()
    m(idx).float().pow(2).mean().backward()
    for n, p in m.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    b = [p.grad for n, p in trainable.items() if "lora_B" in n]
    assert all(g.abs().sum() > 0 for g in b)  # A's gradient is B^T (...) = 0 while B is zero


def test_adapters_are_float32_on_a_bf16_base_and_targets_select():
    m = tiny().to(torch.bfloat16)
    add_adapters(m, r=2, targets=("v_proj", "up_proj"))
    assert lora.settings(m) == Settings(2, 4, 0.0, ("v_proj", "up_proj"))  # alpha None -> 2r
    names = set(lora.adapters(m))
    assert names == {f"layers.{i}.{n}" for i in range(2) for n in ("self_attn.v_proj", "mlp.up_proj")}
    assert all(p.dtype == (torch.float32 if ".lora_" in n else torch.bfloat16) for n, p in m.named_parameters())
    randomize(m.named_parameters())
    assert logits(m, IDX % 64).dtype == torch.bfloat16


def test_disabled_gives_the_base_exactly():
    m = tiny()
    base = logits(m, IDX % 64)
    add_adapters(m, r=4, alpha=8)
    randomize(m.named_parameters())
    adapted = logits(m, IDX % 64)
    assert (adapted - base).abs().max() > 1e-2
    with disabled(m):
        assert torch.equal(logits(m, IDX % 64), base)
    assert torch.equal(logits(m, IDX % 64), adapted)


# ---------------------------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def adapter_dir(tmp_path):
    m = tiny()
    add_adapters(m, r=4, alpha=8)
    lora.save_adapter(m, str(tmp_path / "adapter"), "some/base")
    return str(tmp_path / "adapter")


def one_line_error(exc_type, fn, *args, **kw) -> str:
    with pytest.raises(exc_type) as e:
        fn(*args, **kw)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    return str(e.value)


def test_unknown_target_lists_the_valid_names():
    msg = one_line_error(BadValue, add_adapters, tiny(), r=4, targets=("q_proj", "qproj"))
    assert "qproj" in msg and all(t in msg for t in TARGETS)
    one_line_error(BadValue, add_adapters, tiny(), r=0)


def test_adapter_round_trip_and_config(adapter_dir):
    settings, base = lora.read_adapter_config(adapter_dir)
    assert (settings, base) == (Settings(4, 8, 0.0, TARGETS), "some/base")
    config = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    m = tiny()
    load_adapter(m, adapter_dir)
    one_line_error(BadValue, load_adapter, m, adapter_dir)  # twice: already adapted
    # peft's shorthand for every linear layer but the output layer
    json.dump(dict(config, target_modules="all-linear"), open(os.path.join(adapter_dir, "adapter_config.json"), "w"))
    assert load_adapter(tiny(), adapter_dir).targets == TARGETS


def test_adapter_for_another_base_names_the_file(adapter_dir):
    m = tiny(dim=48)
    msg = one_line_error(BadValue, load_adapter, m, adapter_dir)
    assert os.path.join(adapter_dir, "adapter_model.safetensors") in msg and "shape" in msg
    assert not lora.adapters(m)  # checked before the model was touched


def test_missing_files_name_the_path(adapter_dir, tmp_path):
    os.remove(os.path.join(adapter_dir, "adapter_model.safetensors"))
    msg = one_line_error(NotFound, load_adapter, tiny(), adapter_dir)
    assert os.path.join(adapter_dir, "adapter_model.safetensors") in msg
    os.remove(os.path.join(adapter_dir, "adapter_config.json"))
    msg = one_line_error(NotFound, load_adapter, tiny(), adapter_dir)
    assert os.path.join(adapter_dir, "adapter_config.json") in msg
    one_line_error(NotFound, lora.read_adapter_config, str(tmp_path / "nowhere"))


@pytest.mark.parametrize("key,value", [("use_dora", True), ("use_rslora", True), ("bias", "all"),
                                       ("target_modules", ["q_proj", "lm_head"]), ("modules_to_save", ["lm_head"]),
                                       ("peft_type", "IA3"), ("r", 0), ("layers_to_transform", [0])])
def test_unsupported_config_is_refused(adapter_dir, key, value):
    path = os.path.join(adapter_dir, "adapter_config.json")
    config = json.load(open(path))
    json.dump(dict(config, **{key: value}), open(path, "w"))
    msg = one_line_error(BadValue, load_adapter, tiny(), adapter_dir)
    assert path in msg and key in msg


def test_unknown_config_key_is_named_in_a_warning(adapter_dir):
    path = os.path.join(adapter_dir, "adapter_config.json")
    json.dump(dict(json.load(open(path)), new_variant=True, other_new_key=None), open(path, "w"))
    with pytest.warns(UserWarning, match=r"\['new_variant'\] are not known"):
        load_adapter(tiny(), adapter_dir)


def test_stray_or_missing_tensors_are_refused(adapter_dir):
    from safetensors.torch import load_file, save_file
    file = os.path.join(adapter_dir, "adapter_model.safetensors")
    sd = load_file(file)
    save_file(dict(sd, extra=torch.zeros(1)), file)
    assert "'extra'" in one_line_error(BadValue, load_adapter, tiny(), adapter_dir)
    sd.pop(next(iter(sd)))
    save_file(sd, file)
    assert "lacks 1 adapter tensors" in one_line_error(BadValue, load_adapter, tiny(), adapter_dir)
    open(file, "wb").write(b"not safetensors")
    assert file in one_line_error(BadValue, load_adapter, tiny(), adapter_dir)
