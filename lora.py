"""
Low-rank adapters (LoRA) for model.Transformer, saved and loaded in peft's format.

Each adapted projection keeps its frozen weight W and learns two small matrices A (r, in) and B (out, r):

    y = W x + (alpha / r) * B (A dropout(x))

A starts random (kaiming-uniform with a=sqrt(5), nn.Linear's own init, as peft does by default), B at zero, so a
fresh adapter leaves the model's output unchanged. The base keeps its state-dict names (layers.0.self_attn.q_proj.
weight), so hf_checkpoint reads and writes it as before; the adapters add ...q_proj.lora_A.weight and
...q_proj.lora_B.weight, held in float32 whatever the base dtype. `with disabled(model):` switches them off (DPO's
reference is the same base without them). On disk: adapter_config.json + adapter_model.safetensors with peft's key
names (base_model.model. + the Hugging Face name), which peft.PeftModel.from_pretrained loads; load_adapter also
reads what peft itself wrote. merge_adapters folds B A into W for a plain checkpoint.
"""
import json
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import BadValue, NotFound, read_json
from hf_checkpoint import hf_name, local, own_rows, read_into, safetensors_error

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."  # peft's PeftModel wraps the transformers model: its names start with this
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class Settings:
    r: int
    alpha: float
    dropout: float
    targets: tuple  # in TARGETS' order


class LoRALinear(nn.Linear):
    """An nn.Linear whose weight (and bias) are the base's own Parameters, plus lora_A, lora_B and a switch."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, generator=None):
        nn.Module.__init__(self)  # not nn.Linear's __init__: no new weight, the base's is taken over as it is
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.alpha, self.scaling, self.enabled = r, alpha, alpha / r, True
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(bias=False, dtype=torch.float32, device=base.weight.device)
        self.lora_A = nn.Linear(self.in_features, r, **kw)
        self.lora_B = nn.Linear(r, self.out_features, **kw)
        if base.weight.device.type != "meta":  # on meta (before FSDP's to_empty): init_adapters once allocated
            self.reset_lora(generator)
        self.train(base.training)  # new modules start in training mode: dropout would act in an eval()'d model

    @torch.no_grad()
    def reset_lora(self, generator=None):
        """A kaiming-uniform with a=sqrt(5) (nn.Linear's own init, as peft), B zero. A is drawn whole on the CPU
        (from generator, else the global generator), so every process draws the same A, sharded or not, and
        keeps its own rows of it (FSDP)."""
        a = torch.empty(self.lora_A.weight.shape)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        local(self.lora_A.weight).copy_(a[own_rows(self.lora_A.weight)])
        local(self.lora_B.weight).zero_()

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        a = self.lora_A.weight.dtype
        return y + (self.lora_B(self.lora_A(self.dropout(x.to(a)))) * self.scaling).to(y.dtype)

    def extra_repr(self):
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}, enabled={self.enabled}"


def adapters(model) -> dict:
    """{module name: LoRALinear} of a model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _targeted(model, targets) -> list:
    """[(name, nn.Linear)] of the blocks' linear layers named in targets (never lm_head)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.startswith("layers.") and name.rsplit(".", 1)[-1] in targets]


def add_adapters(model, r: int, alpha: float | None = None, dropout: float = 0.0, targets=TARGETS,
                 generator=None, base_dtype: torch.dtype | None = None) -> Settings:
    """Replace every linear layer named in targets (of every block) by a LoRALinear and freeze everything else:
    the base weights, embeddings, norms and lm_head no longer require gradients. alpha None means 2 * r: the scale
    alpha / r stays 2 whatever the rank, as torchtune's recipes and most published peft recipes set it (peft's own
    LoraConfig default is a fixed lora_alpha=8, whose scale changes with r). A is drawn from generator (else the
    global one), layer by layer; on a meta model nothing is drawn until init_adapters. base_dtype: the frozen
    base is held in it (bf16 when computing in bf16: an fp32 copy of weights that get no updates only costs
    memory); the adapters stay float32. Returns the settings."""
    targets = tuple(targets)
    if unknown := [t for t in targets if t not in TARGETS]:
        raise BadValue(f"LoRA targets {unknown} are not layers of this model (valid: {', '.join(TARGETS)})")
    if not targets:
        raise BadValue(f"LoRA needs at least one target (valid: {', '.join(TARGETS)})")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise BadValue(f"LoRA rank r={r!r} must be a positive integer")
    alpha = 2 * r if alpha is None else alpha
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise BadValue(f"lora_alpha={alpha!r} must be a positive number")
    if not 0 <= dropout < 1:
        raise BadValue(f"lora_dropout={dropout!r} must be in [0, 1)")
    if adapters(model):
        raise BadValue("the model already has LoRA adapters (merge them first, or load the adapter into the base)")
    model.requires_grad_(False)
    for name, m in _targeted(model, targets):
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, LoRALinear(m, r, alpha, dropout, generator))
    if base_dtype is not None:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(base_dtype)
    return Settings(r, alpha, dropout, tuple(t for t in TARGETS if t in targets))


def init_adapters(model, generator=None):
    """Fresh adapters (A random, B zero) for a model whose adapters were added on the meta device and then
    allocated (FSDP's to_empty): the same values add_adapters draws on a built model from the same generator."""
    for m in adapters(model).values():
        m.reset_lora(generator)


def settings(model) -> Settings:
    """The Settings add_adapters gave the model's adapters."""
    mods = adapters(model)
    if not mods:
        raise BadValue("the model has no LoRA adapters")
    one = next(iter(mods.values()))
    p = one.dropout.p if isinstance(one.dropout, nn.Dropout) else 0.0
    return Settings(one.r, one.alpha, p, tuple(t for t in TARGETS if any(n.endswith("." + t) for n in mods)))


@contextmanager
def disabled(model):
    """Within the block the model is its base (adapters off); afterwards they are on again."""
    mods = list(adapters(model).values())
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


class Reference:
    """DPO and TDPO's frozen reference under LoRA: the policy's own base, called with its adapters off. No second
    copy of the weights (the reference is the base the adapters start from: B = 0)."""

    def __init__(self, model):
        self.model, self.lm_head = model, model.lm_head

    def __call__(self, *args, **kwargs):
        with disabled(self.model):
            return self.model(*args, **kwargs)


def adapter_state_dict(model) -> dict:
    """The adapters under peft's key names (base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight),
    gathered whole when FSDP shards them (every rank must call it then)."""
    sd = {PREFIX + hf_name(k): v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
            for k, v in sd.items()}


def save_adapter(model, out_dir: str, base_model_name_or_path: str | None = None, state: dict | None = None):
    """adapter_config.json + adapter_model.safetensors in peft's format; the base defaults to where the model's
    weights came from. The rank, alpha, dropout and targets are those of the model's adapters. state: their
    adapter_state_dict when gathered already (under FSDP every process gathers, one writes)."""
    from safetensors.torch import save_file
    s = settings(model)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                  target_modules=list(s.targets), base_model_name_or_path=base_model_name_or_path or
                  model.name_or_path, bias="none", fan_in_fan_out=False, inference_mode=True, init_lora_weights=True,
                  use_rslora=False, use_dora=False, lora_bias=False, modules_to_save=None, layers_to_transform=None,
                  layers_pattern=None, rank_pattern={}, alpha_pattern={})
    sd = adapter_state_dict(model) if state is None else state
    os.makedirs(out_dir, exist_ok=True)
    save_file(sd, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2)


# adapter_config.json keys that change the forward pass (or which modules carry adapters) when set: peft variants
# this file does not implement. Each must be off (null, false, {} or []) to load.
VARIANTS = ("use_dora", "use_rslora", "use_qalora", "lora_bias", "fan_in_fan_out", "modules_to_save",
            "layers_to_transform", "layers_pattern", "exclude_modules", "rank_pattern", "alpha_pattern",
            "trainable_token_indices", "target_parameters", "layer_replication", "alora_invocation_tokens",
            "arrow_config", "kasa_config", "velora_config", "monteclora_config", "use_bdlora", "megatron_config")
# keys read above, or that cannot change the forward pass (bookkeeping, how the adapter was initialized)
KNOWN = ("peft_type", "task_type", "bias", "target_modules", "r", "lora_alpha", "lora_dropout",
         "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version", "init_lora_weights",
         "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core", "qalora_group_size",
         "ensure_weight_tying", *VARIANTS)


def read_adapter_config(adapter_dir: str) -> tuple[Settings, str | None]:
    """(Settings, base_model_name_or_path) of an adapter directory written by save_adapter or by peft; a LoRA
    variant this file does not implement is refused in one line naming the file and the key."""
    path = os.path.join(adapter_dir, CONFIG)
    if not os.path.isdir(adapter_dir):
        raise NotFound(f"{adapter_dir}: no such adapter directory")
    c = read_json(path)

    def refuse(key, what):
        raise BadValue(f"{path}: {key}={c.get(key)!r} is not supported ({what})")

    if c.get("peft_type") != "LORA":
        refuse("peft_type", "only LORA adapters")
    if c.get("task_type") not in (None, "CAUSAL_LM"):
        refuse("task_type", "a causal language model: CAUSAL_LM")
    if c.get("bias", "none") != "none":
        refuse("bias", "the base's biases stay frozen: 'none'")
    for key in VARIANTS:
        if c.get(key):
            refuse(key, "plain LoRA only")
    if unknown := sorted(k for k in c if k not in KNOWN and c[k]):  # as hf_checkpoint: loaded, never silently
        warnings.warn(f"{path}: keys {unknown} are not known to lora.py and are ignored; if one of them changes "
                      "the adapter's math, its outputs will differ from peft's")
    targets = c.get("target_modules")
    if targets == "all-linear":  # peft: every linear layer but the output layer, which is TARGETS here
        targets = list(TARGETS)
    if not (isinstance(targets, list) and targets and set(targets) <= set(TARGETS)):
        refuse("target_modules", f"a list of {', '.join(TARGETS)} or 'all-linear'")
    r, alpha, dropout = c.get("r"), c.get("lora_alpha", 8), c.get("lora_dropout", 0.0)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        refuse("r", "a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        refuse("lora_alpha", "a positive number")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        refuse("lora_dropout", "a number in [0, 1)")
    s = Settings(r, alpha, float(dropout), tuple(t for t in TARGETS if t in targets))
    return s, c.get("base_model_name_or_path")


def load_adapter(model, adapter_dir: str, into_existing: bool = False) -> Settings:
    """Add the adapters an adapter directory describes to model (its base, without adapters) and load their
    weights; into_existing: the model already carries the same adapters, not yet filled (added on the meta device
    before FSDP sharded them: each process reads only its rows). Keys with or without peft's base_model.model.
    prefix are read; the file must hold every adapter of the
    config's targets in every block, each shaped for this base, and nothing else. Everything is checked before the
    model is touched. Returns the settings."""
    from safetensors import safe_open
    s, _ = read_adapter_config(adapter_dir)
    file = os.path.join(adapter_dir, WEIGHTS)
    if not os.path.exists(file):
        raise NotFound(f"{file}: no such file (peft's older adapter_model.bin, a pickle, is not read)")
    try:
        with safe_open(file, framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise safetensors_error(file, e) from None
    want = {}  # peft's name -> the shape this base needs
    for name, m in _targeted(model, s.targets):
        want[f"{PREFIX}{hf_name(name)}.lora_A.weight"] = (s.r, m.in_features)
        want[f"{PREFIX}{hf_name(name)}.lora_B.weight"] = (m.out_features, s.r)
    named = {k: k if k.startswith(PREFIX) else PREFIX + k for k in stored}
    if extra := [k for k in stored if named[k] not in want]:
        raise BadValue(f"{file}: unexpected tensor {extra[0]!r} (not a LoRA adapter on {', '.join(s.targets)} "
                       "of this model)")
    if missing := sorted(set(want) - set(named.values())):
        raise BadValue(f"{file}: lacks {len(missing)} adapter tensors, e.g. {missing[0]!r}")
    if bad := [k for k in stored if stored[k] != want[named[k]]]:
        raise BadValue(f"{file}: {bad[0]} has shape {stored[bad[0]]}, expected {want[named[bad[0]]]} (an adapter "
                       f"for another base model? {CONFIG} says r={s.r})")
    if into_existing:
        if settings(model) != s:
            raise BadValue(f"{file}: adapters {s}, but the model carries {settings(model)}")
    else:
        add_adapters(model, s.r, s.alpha, s.dropout, s.targets)
    params = {PREFIX + hf_name(k): p for k, p in model.state_dict(keep_vars=True).items() if ".lora_" in k}
    read_into({k: params[named[k]] for k in stored}, dict.fromkeys(stored, file))
    return s


@torch.no_grad()
def merge_adapters(model):
    """W <- W + (alpha / r) B A in every adapted layer, computed in float32, and each LoRALinear replaced by a plain
    nn.Linear holding the same Parameters: save_pretrained then writes a plain Hugging Face checkpoint. The base
    stays frozen (requires_grad False). Returns the model."""
    for name, m in adapters(model).items():
        delta = (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.scaling
        m.weight.copy_((m.weight.float() + delta).to(m.weight.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias
        parent, leaf = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, plain)
    return model


def merged(cls, adapter_dir: str, dtype=None, device=None, shard=None):
    """cls.from_pretrained of an adapter directory: the base its config names (base_model_name_or_path), the
    adapters loaded and merged in, then shard(model) when given (on the whole merged model: under FSDP each rank
    reads every row once). One clear error when the base is missing or does not fit the adapters."""
    _, base = read_adapter_config(adapter_dir)
    if not base:
        raise BadValue(f"{os.path.join(adapter_dir, CONFIG)}: no base_model_name_or_path, so its base model is "
                       "unknown")
    try:
        model = cls.from_pretrained(base, dtype, device)
    except (NotFound, OSError) as e:
        raise NotFound(f"{adapter_dir}: its base model {base} (base_model_name_or_path) cannot be loaded: "
                       f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    load_adapter(model, adapter_dir)
    merge_adapters(model)
    if shard is not None:  # what from_pretrained's shard does on the meta model, here on the merged one
        shard(model)
    model.name_or_path = adapter_dir
    return model.eval()


def main(argv=None):
    """python lora.py merge ADAPTER_DIR OUT_DIR: a plain Hugging Face checkpoint of base + adapters."""
    import argparse
    from errors import UserError
    from model import Transformer
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("command", choices=["merge"])
    ap.add_argument("adapter_dir", help="adapter_config.json + adapter_model.safetensors (train.py --lora, or peft)")
    ap.add_argument("out_dir", help="a new or empty folder for the merged model")
    args = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(args.adapter_dir, CONFIG)):
        raise UserError(f"{args.adapter_dir}: no {CONFIG}, so not an adapter folder (nothing to merge)")
    if os.path.exists(args.out_dir) and (not os.path.isdir(args.out_dir) or os.listdir(args.out_dir)):
        raise UserError(f"{args.out_dir} exists and is not an empty folder: nothing written")
    model = Transformer.from_pretrained(args.adapter_dir)  # the base, adapters merged in
    tokenizer_dir = args.adapter_dir if os.path.exists(os.path.join(args.adapter_dir, "tokenizer_config.json")) \
        else read_adapter_config(args.adapter_dir)[1]
    model.save_pretrained(args.out_dir, tokenizer_dir=tokenizer_dir)
    print(f"merged: {args.adapter_dir} into its base, saved in {args.out_dir}")


if __name__ == "__main__":
    from errors import run
    run(main)
