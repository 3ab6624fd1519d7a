"""train.py end to end on CPU: methods, DDP/FSDP over gloo, resume, bad input, checkpoints transformers loads."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_rows, write_jsonl
from errors import UserError
import train
from model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(init, data, out, *extra):
    return ["--init", init, "--data", data[0], "--eval_data", data[1], "--out_dir", str(out), "--device", "cpu",
            "--batch_size", "4", "--grad_accum", "2", "--max_steps", "4", "--lr", "1e-3", "--optimizer", "adamw",
            "--eval_every", "0", "--sample_every", "0", "--seed", "0", *extra]


def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def batch_loss(path, rows_path):
    """SFT loss of the model at path on the first 8 training examples."""
    import ift
    from data import collate, tokenize_sources
    ex = tokenize_sources(rows_path, path, 256, log=lambda *a: None)[:8]
    x, y = collate(ex)
    with torch.no_grad():
        return ift.sft_forward(Transformer.from_pretrained(path), x, y).item()


@pytest.mark.parametrize("method", ["sft", "ift"])
def test_training_lowers_loss_and_writes_hf_checkpoint(method, tiny_dir, rows_file, tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / method
    train.main(args(tiny_dir, rows_file, out, "--method", method, "--max_steps", "8"))
    assert batch_loss(str(out), rows_file[0]) < batch_loss(tiny_dir, rows_file[0]) - 0.1
    # out_dir is itself a Hugging Face model directory, with the tokenizer beside the weights
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    idx = torch.randint(0, 49152, (2, 16))
    with torch.no_grad():
        assert (ref(idx).logits - Transformer.from_pretrained(str(out))(idx)).abs().max() <= 1e-4


def test_ift_with_lam0_gamma0_equals_sft(tiny_dir, rows_file, tmp_path):
    train.main(args(tiny_dir, rows_file, tmp_path / "sft", "--method", "sft"))
    train.main(args(tiny_dir, rows_file, tmp_path / "ift", "--method", "ift", "--lam", "0", "--gamma", "0"))
    a, b = weights(tmp_path / "sft"), weights(tmp_path / "ift")
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = weights(tiny_dir)  # and training did change them
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("pack", [[], ["--pack"]])
def test_resume_continues_exactly(pack, tiny_dir, rows_file, tmp_path):
    train.main(args(tiny_dir, rows_file, tmp_path / "full", "--max_steps", "6", *pack))
    # a run that stops after step 3 (as a killed or time-boxed job would, after its checkpoint), then resumes
    train.main(args(tiny_dir, rows_file, tmp_path / "cut", "--max_steps", "6", "--save_every", "3", "--stop_at", "3",
                    *pack))
    state = json.load(open(tmp_path / "cut" / "checkpoint" / "train_config.json"))
    assert state["step"] == 3 and not os.path.exists(tmp_path / "cut" / "model.safetensors")
    with pytest.raises(UserError, match="--resume"):  # never silently start over on top of a checkpoint
        train.main(args(tiny_dir, rows_file, tmp_path / "cut", "--max_steps", "6", *pack))
    train.main(args(tiny_dir, rows_file, tmp_path / "cut", "--max_steps", "6", "--resume", *pack))
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"
    assert json.load(open(tmp_path / "cut" / "train_config.json"))["step"] == 6


# a training process that dies (SIGKILL) at a chosen point of its second save (step 4 of 6, saving every 2) or of
# publishing the final one (checkpoint.py numbers the points): every point must be survivable
KILLER = """
import os, shutil, signal, sys, torch
sys.path.insert(0, {root!r})
import train
point, argv = sys.argv[1], sys.argv[2:]
seen = {{}}
replace, save, rmtree = os.replace, torch.save, shutil.rmtree

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def count(key):
    seen[key] = seen.get(key, 0) + 1
    return seen[key]

def save_or_die(obj, f, *args, **kw):  # step 1: resume.pt is written last into checkpoint.tmp
    save(obj, f, *args, **kw)
    if str(f).endswith("resume.pt") and count("resume.pt") == 2 and point == "tmp_half_written":
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        die()

def replace_or_die(src, dst):
    name = os.path.basename(dst)
    n = count(name)
    if (point, name, n) in [("tmp_written", "checkpoint.old", 1), ("between_renames", "checkpoint", 2)]:
        die()  # before step 2, before step 3
    replace(src, dst)
    if point == "publishing" and not name.startswith("checkpoint") and count("published") == 2:
        die()  # step 5, two files of the final model in out_dir, the rest not

def rmtree_or_die(path, *args, **kw):
    if os.path.basename(str(path)) == "checkpoint.old" and os.path.isdir(path):  # step 4 of the second save
        if point == "old_not_removed":
            die()
        if point == "old_half_removed":
            os.remove(os.path.join(path, "model.safetensors"))
            die()
    rmtree(path, *args, **kw)

os.replace, torch.save, shutil.rmtree = replace_or_die, save_or_die, rmtree_or_die
train.main(argv)
"""
# where each point leaves the latest complete checkpoint: its folder and step
KILL_POINTS = {"tmp_half_written": ("checkpoint", 2), "tmp_written": ("checkpoint", 2),
               "between_renames": ("checkpoint.old", 2), "old_not_removed": ("checkpoint", 4),
               "old_half_removed": ("checkpoint", 4), "publishing": ("checkpoint", 6)}


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    train.main(args(tiny_dir, rows_file, out, "--max_steps", "6", "--save_every", "2", "--optimizer", "rmsprop"))
    return weights(out)


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_while_saving_resumes_from_the_last_complete_checkpoint(point, tiny_dir, rows_file, uninterrupted,
                                                                      tmp_path):
    import signal
    import checkpoint
    out = tmp_path / "out"
    run = args(tiny_dir, rows_file, out, "--max_steps", "6", "--save_every", "2", "--optimizer", "rmsprop")
    # the killed process computes steps 1-2 of the compared weights: same thread count as this process, since
    # a CPU matmul's rounding can depend on how many threads split it
    r = subprocess.run([sys.executable, "-c", KILLER.format(root=ROOT), point, *run], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ckpt = checkpoint.find_checkpoint(str(out))
    assert (os.path.basename(ckpt), json.load(open(os.path.join(ckpt, "train_config.json")))["step"]) == \
        KILL_POINTS[point]
    with pytest.raises(UserError, match="--resume"):  # a rerun without --resume touches nothing
        train.main(run)
    train.main(run + ["--resume"])
    final = weights(out)
    assert all(torch.equal(final[k], uninterrupted[k]) for k in final), "resumed run differs from the uninterrupted one"
    left = [name for name in os.listdir(out) if name.endswith((".tmp", ".old"))]
    assert not left, left  # leftovers cleaned
    assert json.load(open(out / "train_config.json"))["step"] == 6
    train.main(run + ["--resume"])  # resuming a finished run again: nothing to do, nothing lost
    assert all(torch.equal(weights(out)[k], uninterrupted[k]) for k in final)


def torchrun(nproc, argv, tmp_path, script=os.path.join(ROOT, "train.py"), ok=True, timeout=600, launcher=(), env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *launcher,
           script, *argv]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.parametrize("mode", ["ddp", "ddp_checkpointing", "fsdp", "fsdp_tied", "ddp_pack", "fsdp_pack"])
def test_two_processes_equal_one_with_twice_the_accumulation(mode, tiny_dir, tiny_tied_dir, rows_file, tmp_path):
    init = tiny_tied_dir if mode == "fsdp_tied" else tiny_dir
    extra = {"ddp": [], "ddp_checkpointing": ["--grad_checkpointing"], "fsdp": ["--fsdp"], "fsdp_tied": ["--fsdp"],
             "ddp_pack": [], "fsdp_pack": ["--fsdp"]}
    pack = ["--pack"] if mode.endswith("pack") else []  # both sides packed: the examples of each rank end to end
    base = args(init, rows_file, tmp_path / "one", "--method", "ift", "--grad_accum", "2", *pack)
    train.main(base)
    two = args(init, rows_file, tmp_path / "two", "--method", "ift", "--grad_accum", "1", *extra[mode], *pack)
    torchrun(2, two, tmp_path)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    embed = "model.embed_tokens.weight"
    assert set(a) == set(b) and not torch.equal(a[embed], weights(init)[embed])  # it trained
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    if mode == "fsdp_tied":  # saved once, and it reloads as one table in both readers
        from transformers import AutoModelForCausalLM
        assert "lm_head.weight" not in b
        ours = Transformer.from_pretrained(str(tmp_path / "two"))
        assert ours.lm_head.weight is ours.embed_tokens.weight
        ref = AutoModelForCausalLM.from_pretrained(str(tmp_path / "two"), dtype=torch.float32)
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()


# train.py with every safetensors read recorded: (rank, file, tensor, rows in the file, rows read), to reads.jsonl
READ_RECORDER = """
import json, os, sys
sys.path.insert(0, {root!r})
import safetensors, train
opened, reads = safetensors.safe_open, []

class Slice:
    def __init__(self, inner, file, name):
        self.inner, self.file, self.name = inner, file, name
    def __getitem__(self, index):
        t = self.inner[index]
        reads.append((self.file, self.name, self.inner.get_shape()[0], t.shape[0]))
        return t
    def __getattr__(self, attr):
        return getattr(self.inner, attr)

class File:
    def __init__(self, file, *a, **k):
        self.inner, self.file = opened(file, *a, **k), os.path.basename(file)
    def __enter__(self):
        self.inner.__enter__()
        return self
    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)
    def get_slice(self, name):
        return Slice(self.inner.get_slice(name), self.file, name)
    def get_tensor(self, name):
        t = self.inner.get_tensor(name)
        reads.append((self.file, name, t.shape[0] if t.dim() else 0, t.shape[0] if t.dim() else 0))
        return t
    def __getattr__(self, attr):
        return getattr(self.inner, attr)

safetensors.safe_open = File
train.main()
with open("reads.jsonl", "a") as f:
    f.writelines(json.dumps([int(os.environ["RANK"]), *r]) + "\\n" for r in reads)
"""


def test_fsdp_resume_under_torchrun_continues_exactly(tiny_tied_dir, rows_file, tmp_path):
    """Two FSDP ranks stop after step 2, then resume: the same weights, bit for bit, as the uninterrupted two-rank
    run; and each rank read only its own half of the rows of every weight and optimizer moment."""
    full = args(tiny_tied_dir, rows_file, tmp_path / "full", "--fsdp", "--grad_accum", "1", "--max_steps", "4")
    torchrun(2, full, tmp_path)
    cut = args(tiny_tied_dir, rows_file, tmp_path / "cut", "--fsdp", "--grad_accum", "1", "--max_steps", "4")
    torchrun(2, cut + ["--stop_at", "2"], tmp_path)
    assert {"optimizer.safetensors", "resume.pt"} <= set(os.listdir(tmp_path / "cut" / "checkpoint"))
    (tmp_path / "recorder.py").write_text(READ_RECORDER.format(root=ROOT))
    r = torchrun(2, cut + ["--resume"], tmp_path, script=str(tmp_path / "recorder.py"))
    assert "resumed from" in r.stdout + r.stderr
    reads = [json.loads(line) for line in open(tmp_path / "reads.jsonl")]
    for file in ("model.safetensors", "optimizer.safetensors"):
        rows = [(rank, n, got) for rank, f, _, n, got in reads if f == file and n > 1]
        assert len(rows) > 10 and {rank for rank, _, _ in rows} == {0, 1}, file
        assert all(got == -(-n // 2) if rank == 0 else got == n // 2 for rank, n, got in rows), file
    a, b = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed FSDP run differs from the uninterrupted one"


def test_fsdp_without_torchrun_is_a_world_of_one(tiny_dir, rows_file, tmp_path):
    """`python train.py --fsdp` runs as a single-process FSDP job, and ends where the plain run ends."""
    train.main(args(tiny_dir, rows_file, tmp_path / "plain", "--method", "ift"))
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args(tiny_dir, rows_file, tmp_path / "fsdp", "--fsdp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "fsdp")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


# rank 1 SIGKILLs itself at the top of step 4; with a marker file, only the first time (a restarted rank lives)
RANK_KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import train
lr_at, once = train.lr_at, {once!r}

def lr_or_die(step, total, cfg):  # called once at the top of every step
    if step == 3 and os.environ["RANK"] == "1" and not (once and os.path.exists(once)):
        if once:
            open(once, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return lr_at(step, total, cfg)

train.lr_at = lr_or_die
train.main()
"""


def two_rank_args(tiny_dir, rows_file, out):
    return args(tiny_dir, rows_file, out, "--grad_accum", "1", "--max_steps", "6", "--save_every", "2")


@pytest.fixture(scope="module")
def two_rank_uninterrupted(tiny_dir, rows_file, tmp_path_factory):
    """The final weights of an uninterrupted two-rank DDP run of 6 steps, saving every 2."""
    tmp = tmp_path_factory.mktemp("two_rank")
    torchrun(2, two_rank_args(tiny_dir, rows_file, tmp / "full"), tmp)
    return weights(tmp / "full")


def test_two_nodes_of_one_process_end_with_the_one_node_two_process_weights(tiny_dir, rows_file, tmp_path,
                                                                            two_rank_uninterrupted):
    """torchrun across two machines, here two launchers on one host: --nnodes 2, one process per node, a c10d
    rendezvous on the first node's address. The two ranks do what the 2-process single-node run does (same data
    slices, gloo's sum of two gradients is the same in either order), so the weights are bit for bit equal."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    argv = two_rank_args(tiny_dir, rows_file, tmp_path / "out")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(rank), "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_id", "ift-test",
                               "--rdzv_endpoint", f"127.0.0.1:{port}", os.path.join(ROOT, "train.py"), *argv],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-2000:] for log in logs)
    final = weights(tmp_path / "out")
    assert all(torch.equal(final[k], two_rank_uninterrupted[k]) for k in final), "two nodes differ from one"


def test_killed_rank_stops_the_job_and_resume_equals_the_uninterrupted_run(tiny_dir, rows_file, tmp_path,
                                                                          two_rank_uninterrupted):
    """Rank 1 of two dies at step 4 of 6 (after the step-2 checkpoint): torchrun ends the job in bounded time
    instead of leaving rank 0 waiting in a collective, and a rerun with --resume ends where an uninterrupted
    two-rank run ends, bit for bit."""
    import time
    (tmp_path / "killer.py").write_text(RANK_KILLER.format(root=ROOT, once=None))
    cut = two_rank_args(tiny_dir, rows_file, tmp_path / "cut")
    t0 = time.time()
    r = torchrun(2, cut, tmp_path, script=str(tmp_path / "killer.py"), ok=False, timeout=120)
    assert r.returncode != 0 and time.time() - t0 < 120
    assert "Signal 9" in r.stderr or "SIGKILL" in r.stderr, r.stderr[-2000:]
    assert json.load(open(tmp_path / "cut" / "checkpoint" / "train_config.json"))["step"] == 2
    torchrun(2, cut + ["--resume"], tmp_path)
    a, b = two_rank_uninterrupted, weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"


BAD = {
    "malformed": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                  '{"messages": [oops\n', "bad.jsonl:2: not valid JSON (Expecting value at column 15)"),
    "fields": ('{"question": "hi"}\n', "row 1: row has none of the fields"),
    "role": ('{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
             "unknown role 'wizard'"),
    "empty": ("\n", "the dataset is empty"),
}


@pytest.mark.parametrize("key,value", [("hidden_act", "gelu"), ("rope_scaling", {"rope_type": "yarn", "factor": 4.0})])
def test_refused_config_stops_in_one_line_before_training(key, value, tiny_dir, rows_file, tmp_path):
    import shutil
    init = tmp_path / "init"
    shutil.copytree(tiny_dir, init)
    hf = json.loads((init / "config.json").read_text())
    (init / "config.json").write_text(json.dumps(dict(hf, **{key: value})))
    with pytest.raises(UserError) as e:
        train.main(args(str(init), rows_file, tmp_path / "out"))
    message = str(e.value)
    assert message.startswith(f"{init}/config.json: {key}") and "\n" not in message, message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", list(BAD) + ["hub_offline", "no_file"])
def test_bad_input_stops_with_a_clear_message_and_clean_out_dir(case, tiny_dir, rows_file, tmp_path, monkeypatch):
    if case in BAD:
        content, message = BAD[case]
        (tmp_path / "bad.jsonl").write_text(content)
        data = str(tmp_path / "bad.jsonl")
    elif case == "hub_offline":
        data, message = "someone/not-a-dataset:train", "could not load hub dataset 'someone/not-a-dataset'"
    else:
        data, message = str(tmp_path / "missing.jsonl"), "missing.jsonl: no such file"
    out = tmp_path / "out"
    monkeypatch.setattr(train.Transformer, "from_pretrained", classmethod(
        lambda *a, **k: pytest.fail("the model was loaded before the data was checked")))
    with pytest.raises(UserError) as e:
        train.main(args(tiny_dir, (data, rows_file[1]), out))
    assert message in str(e.value)
    assert not out.exists()


def test_smollm2_both_methods_lower_the_loss(smollm2_dir, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", chat_rows(4))
    before = batch_loss(smollm2_dir, rows)
    for method in ("sft", "ift"):
        out = tmp_path / method
        train.main(["--init", smollm2_dir, "--data", rows, "--eval_data", rows, "--out_dir", str(out),
                    "--method", method, "--batch_size", "4", "--max_steps", "2", "--warmup_ratio", "0",
                    "--lr", "1e-4", "--optimizer", "adamw", "--eval_every", "0", "--sample_every", "0"])
        assert batch_loss(str(out), rows) < before, method


@pytest.mark.parametrize("method", ["sft", "ift"])
def test_flops_per_token_counts_what_flop_counter_sees(method):
    """train.flops_per_token (PaLM's 6N + 12 L H Q T; IFT one more forward) against torch's FlopCounterMode on a
    real step. On CPU FlopCounterMode does not see SDPA, so attention is added from the formula; what is left
    between the two is the norm weights (counted in N) and IFT's (T, T) propagation matmul: well under 1%."""
    from torch.utils.flop_counter import FlopCounterMode
    import ift
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96)
    model = Transformer(cfg)
    B, T = 2, 24
    idx = torch.randint(0, 96, (B, T))
    targets = torch.roll(idx, -1, 1)  # every position learned: the formula's assumption
    # FlopCounterMode has no formula for the in-place addmm_ the chunked head accumulates its gradients with
    def addmm_(self_shape, a_shape, b_shape, **kw):  # self (m, n) += a (m, k) @ b (k, n): 2 m k n
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_}) as counter:
        if method == "sft":
            loss = ift.sft_loss(model(idx), targets)
        else:
            loss = ift.ift_forward(model, idx, targets, 0.2, 0.95)[0]
        loss.backward()
    passes = {"sft": 3, "ift": 4}[method]  # forward = 1, backward = 2
    attention = passes * 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T * B * T
    want = train.flops_per_token(model, T, method) * B * T
    # hardware, not model, FLOPs: IFT's chunked head computes each chunk's logits again in backward
    recompute = 2 * B * T * cfg.vocab_size * cfg.dim if method == "ift" else 0
    assert abs(counter.get_total_flops() - recompute + attention - want) < 0.01 * want


def test_peak_tables_pick_the_most_specific_gpu_name(monkeypatch):
    import bench
    cuda = torch.device("cuda", 0)
    for name, flops, bandwidth in [("NVIDIA H100 80GB HBM3", 989e12, 3.35e12), ("NVIDIA H100 PCIe", 756e12, 2.0e12),
                                   ("NVIDIA H200", 989e12, 4.8e12), ("NVIDIA A100-SXM4-80GB", 312e12, 2.039e12),
                                   ("NVIDIA A100-SXM4-40GB", 312e12, 1.555e12), ("Tesla T4", None, None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert bench.device_peaks(cuda, 0, 0) == (flops, bandwidth), name
    assert bench.device_peaks(torch.device("cpu"), 0, 0) == (None, None)
    assert bench.device_peaks(torch.device("cpu"), 2.5, 40) == (2.5e12, 40e9)  # the flags win everywhere


def test_log_shows_eval_loss_at_step_0_and_the_sampled_prompt(tiny_dir, rows_file, tmp_path, capsys):
    train.main(args(tiny_dir, rows_file, tmp_path / "out", "--eval_every", "2", "--max_steps", "2",
                    "--sample_every", "-1"))
    out = capsys.readouterr().out.splitlines()
    first_question = json.loads(open(rows_file[1]).readline())["messages"][0]["content"]
    assert [line for line in out if line.startswith("step 0: eval ")]
    assert [line for line in out if line.startswith("sample prompt: ") and first_question in line]
    assert [line for line in out if line.startswith("sample before: ")]
    assert [line for line in out if line.startswith("sample after: ")]


def test_bf16_compiled_run_logs_mfu_and_saves_a_loadable_model(tiny_dir, rows_file, tmp_path, capsys):
    out = tmp_path / "compiled"
    train.main(args(tiny_dir, rows_file, out, "--method", "ift", "--dtype", "bf16", "--compile",
                    "--peak_tflops", "1", "--eval_every", "2", "--max_steps", "2"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step 2: ")]
    assert len(lines) == 1 and "mfu" in lines[0] and "eval" in lines[0], lines
    values = dict(pair.split(" ") for pair in lines[0].removeprefix("step 2: ").split(", "))
    assert 0 < float(values["mfu"]) and all(math.isfinite(float(v)) for v in values.values())
    reloaded = Transformer.from_pretrained(str(out))
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


def test_compiled_update_follows_the_eager_one_and_resumes_exactly(tiny_dir, rows_file, tmp_path):
    """--compile compiles RMSprop's update too (train.make_optimizer), its learning rate a tensor changed in place:
    the run follows the eager one (float rounding of fused kernels apart), its schedule's every value reaching the
    update, and a compiled run stopped at step 2 and resumed ends bit for bit where the uninterrupted one does."""
    rms = ("--optimizer", "rmsprop", "--lr", "1e-4", "--max_steps", "4", "--warmup_ratio", "0.5")
    train.main(args(tiny_dir, rows_file, tmp_path / "eager", *rms))
    train.main(args(tiny_dir, rows_file, tmp_path / "full", *rms, "--compile"))
    train.main(args(tiny_dir, rows_file, tmp_path / "cut", *rms, "--compile", "--save_every", "2", "--stop_at", "2"))
    train.main(args(tiny_dir, rows_file, tmp_path / "cut", *rms, "--compile", "--resume"))
    a, b, c = (weights(tmp_path / d) for d in ("eager", "full", "cut"))
    init = weights(tiny_dir)
    for k in a:
        moved = (a[k] - init[k]).norm()
        assert moved > 0 and (a[k] - b[k]).norm() <= 1e-4 * moved, k  # 1e-4 of what training moved it
        assert torch.equal(b[k], c[k]), k


def test_fsdp_compiled_update_follows_the_eager_one(tiny_tied_dir, rows_file, tmp_path):
    """Two FSDP ranks with --compile: the compiled update runs on each rank's shards (DTensors) and the run follows
    the eager FSDP one, as test_compiled_update_follows_the_eager_one_and_resumes_exactly asks of one process."""
    for name, extra in (("compiled", ["--compile"]), ("eager", [])):
        torchrun(2, args(tiny_tied_dir, rows_file, tmp_path / name, "--fsdp", "--grad_accum", "1", "--max_steps", "3",
                         "--optimizer", "rmsprop", "--lr", "1e-4", *extra), tmp_path)
    a, b, init = weights(tmp_path / "eager"), weights(tmp_path / "compiled"), weights(tiny_tied_dir)
    for k in a:
        assert (a[k] - init[k]).norm() > 0 and (a[k] - b[k]).norm() <= 1e-4 * (a[k] - init[k]).norm(), k


def test_resume_without_a_checkpoint_is_a_clear_error(tiny_dir, rows_file, tmp_path):
    with pytest.raises(UserError, match="--resume: no checkpoint in"):
        train.main(args(tiny_dir, rows_file, tmp_path / "empty", "--resume"))
    assert not (tmp_path / "empty").exists()
    # a checkpoint of an older train.py (optimizer state inside resume.pt), or resumed with another optimizer
    out = tmp_path / "old"
    train.main(args(tiny_dir, rows_file, out, "--max_steps", "2", "--stop_at", "1", "--save_every", "1"))
    with pytest.raises(UserError, match="trained with --optimizer adamw"):
        train.main(args(tiny_dir, rows_file, out, "--max_steps", "2", "--resume", "--optimizer", "rmsprop"))
    os.remove(out / "checkpoint" / "optimizer.safetensors")
    with pytest.raises(UserError, match="checkpoint/ is incomplete: it lacks one of resume.pt, optimizer"):
        train.main(args(tiny_dir, rows_file, out, "--max_steps", "2", "--resume"))


def test_eval_fraction_holds_out_that_share_of_the_training_rows(tiny_dir, rows_file, tmp_path, capsys):
    train.main(args(tiny_dir, (rows_file[0], ""), tmp_path / "out", "--eval_fraction", "0.25", "--max_steps", "1"))
    assert "data: 24 train examples / 8 eval examples" in capsys.readouterr().out


def test_presets_replace_defaults_and_flags_win():
    from presets import PRESETS
    cfg = train.parse_args(["--preset", "paper"])
    assert all(getattr(cfg, k) == v for k, v in PRESETS["paper"].items())
    assert (cfg.lam, cfg.gamma, cfg.optimizer, cfg.lr, cfg.fsdp) == (0.2, 0.95, "rmsprop", 5e-7, True)
    assert train.parse_args(["--preset", "paper", "--lr", "1e-6", "--no-fsdp"]).lr == 1e-6
    assert train.parse_args(["--preset", "paper", "--no-fsdp"]).fsdp is False
    assert train.parse_args([]) == train.TrainConfig()


def test_torchrun_max_restarts_resumes_automatically(tiny_dir, rows_file, tmp_path, two_rank_uninterrupted):
    """torchrun --max-restarts=1 with --auto_resume: the first start begins fresh (no checkpoint yet), rank 1
    dies once at step 4 of 6, torchrun restarts both workers, they resume from the step-2 checkpoint, and the
    job succeeds with the uninterrupted run's weights, bit for bit."""
    marker = tmp_path / "killed_once"
    (tmp_path / "killer.py").write_text(RANK_KILLER.format(root=ROOT, once=str(marker)))
    run = two_rank_args(tiny_dir, rows_file, tmp_path / "out") + ["--auto_resume"]
    # torchrun's agent keeps one TCP store across restarts by default, and a restarted gloo (or NCCL) group can
    # read the dead group's addresses from it (pytorch/pytorch#135712): a fresh store per restart avoids that
    r = torchrun(2, run, tmp_path, script=str(tmp_path / "killer.py"), timeout=180, launcher=["--max-restarts=1"],
                 env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    log = r.stdout + r.stderr
    assert marker.exists() and "resumed from" in log and "at step 2" in log, log[-3000:]
    final = weights(tmp_path / "out")
    assert all(torch.equal(final[k], two_rank_uninterrupted[k]) for k in final), "restarted run differs"


def test_train_prints_how_many_examples_it_dropped(tiny_dir, rows_file, tmp_path, capsys):
    """An example with nothing to learn (an empty answer under a template whose turns end in plain text) is
    dropped, and train.py's log says so before the data line."""
    import shutil
    init = tmp_path / "init"
    shutil.copytree(tiny_dir, init)
    (init / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                                              "{% endfor %}")
    rows = chat_rows(7) + [{"prompt": "Say nothing.", "response": ""}]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    train.main(args(str(init), (data, rows_file[1]), tmp_path / "out", "--max_steps", "1"))
    out = capsys.readouterr().out
    assert "data: dropped 1 of 8 examples with no answer token to learn" in out
    assert "data: 7 train " in out  # the 8th is gone


def test_lr_warms_up_linearly_then_decays_on_a_cosine_to_zero():
    cfg = train.TrainConfig(lr=1.0, warmup_ratio=0.1)
    lrs = [train.lr_at(step, 100, cfg) for step in range(100)]
    assert lrs[:10] == [(step + 1) / 10 for step in range(10)]
    assert lrs[10] == 1.0 and math.isclose(lrs[55], 0.5) and 0 < lrs[99] < 1e-3
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))


def test_default_optimizer_is_rmsprop_and_gradients_are_clipped(tiny_dir, rows_file, tmp_path, monkeypatch):
    """Without --optimizer the run uses the paper's RMSprop (the checkpoint holds its moment, square_avg), and each
    step clips the gradient norm at --grad_clip (1.0 by default; 0 turns it off: a bound of inf)."""
    clip, clipped = torch.nn.utils.clip_grad_norm_, []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm, *a, **k: clipped.append(max_norm) or clip(params, max_norm, *a, **k))
    argv = args(tiny_dir, rows_file, tmp_path / "out", "--max_steps", "2")
    del argv[argv.index("--optimizer"):argv.index("--optimizer") + 2]
    train.main(argv)
    moments = load_file(tmp_path / "out" / "checkpoint" / "optimizer.safetensors")
    assert {name.rsplit(".", 1)[1] for name in moments} == {"step", "square_avg"}
    assert clipped == [1.0, 1.0]
    train.main(args(tiny_dir, rows_file, tmp_path / "off", "--max_steps", "1", "--grad_clip", "0"))
    assert clipped == [1.0, 1.0, math.inf]  # off: the norm is still measured (the non-finite check), never clipped


@pytest.mark.parametrize("flag, learn", [([], "last"), (["--learn_all_turns"], "all")])
def test_learn_all_turns_reaches_the_data(flag, learn, tiny_dir, rows_file, tmp_path, monkeypatch):
    from data import DataError
    seen = []

    def record(sources, tokenizer_dir, max_length, learn, *rest):
        seen.append(learn)
        raise DataError("stop here")

    monkeypatch.setattr(train, "tokenize_sources", record)
    with pytest.raises(UserError, match="stop here"):
        train.main(args(tiny_dir, rows_file, tmp_path / "out", *flag))
    assert seen == [learn]
