"""train.py never loses what the user has: out_dir refusals (hashed before and after), non-finite runs that stop
without publishing, --resume that refuses what it cannot continue, bad flags, Ctrl-C and SIGTERM."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT, write_jsonl
from errors import UserError
from test_train import args, weights
from conftest import chat_rows
from model import Transformer
import train


def tree_hash(path) -> dict:
    """{relative path: sha256} of every file under path (a file: itself)."""
    if os.path.isfile(path):
        return {"": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    return {os.path.relpath(os.path.join(d, f), path): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(path) for f in files}


@pytest.fixture(scope="module")
def cut_run(tiny_dir, rows_file, tmp_path_factory):
    """A run of 6 steps that stopped after its step-2 checkpoint."""
    out = tmp_path_factory.mktemp("cut") / "out"
    train.main(args(tiny_dir, rows_file, out, "--max_steps", "6", "--save_every", "2", "--stop_at", "2"))
    return out


@pytest.fixture(scope="module")
def finished_run(tiny_dir, rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "out"
    train.main(args(tiny_dir, rows_file, out, "--max_steps", "1"))
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(train.Transformer, "from_pretrained", classmethod(
        lambda *a, **k: pytest.fail("the model was loaded before out_dir was checked")))


@pytest.mark.parametrize("case", ["file", "foreign", "finished", "init", "incomplete_checkpoint", "empty"])
def test_out_dir_that_would_lose_something_is_refused_untouched(case, tiny_dir, rows_file, finished_run, tmp_path,
                                                                 no_model_load):
    out, init, resume = tmp_path / "out", tiny_dir, False
    if case == "file":
        out.write_text("my notes")
        message = "is a file"
    elif case == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("a week of work")
        message = "is not empty (notes.txt)"
    elif case == "finished":  # a finished run whose checkpoint/ was removed (to save space): the model stays
        shutil.copytree(finished_run, out)
        shutil.rmtree(out / "checkpoint")
        message = "is not empty (config.json"
    elif case == "init":  # --out_dir equal to --init, even with --resume
        shutil.copytree(tiny_dir, out)
        init, resume, message = str(out), True, "holds the --init model"
    elif case == "incomplete_checkpoint":  # a checkpoint/ without resume.pt is not "no checkpoint"
        shutil.copytree(finished_run, out)
        os.remove(out / "checkpoint" / "resume.pt")
        message = "is not empty (checkpoint"
    else:
        out, message = "", "--out_dir is empty"
    before = tree_hash(out) if out else None
    argv = args(init, rows_file, out, *(["--resume"] if resume else []))
    with pytest.raises(UserError, match=re.escape(message)):
        train.main(argv)
    if out:
        assert tree_hash(out) == before
    if case == "incomplete_checkpoint":
        with pytest.raises(UserError, match="checkpoint/ is incomplete"):
            train.main(argv + ["--resume"])


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr must be a finite number"), (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "-1"], "--lr, --weight_decay"), (["--max_steps", "-1"], "--max_steps must be >= 0"),
    (["--lam_min", "1.5"], "--lam_min must lie in"), (["--epochs", "0"], "--epochs > 0"),
    (["--eval_fraction", "1"], "--eval_fraction must lie in"), (["--seed", "-3"], "--seed"),
    (["--guess_k", "0"], "--guess_k must be >= 1"), (["--method", "ppo"], "invalid choice: 'ppo'"),
    (["--warmup_ratio", "2"], "--warmup_ratio"), (["--sample_every", "-2"], "--sample_every")])
def test_flags_out_of_range_are_one_argparse_line(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(flags)
    err = capsys.readouterr().err.strip().splitlines()  # argparse: the usage, then one line
    assert e.value.code == 2 and ": error: " in err[-1] and message in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_guess_k_beyond_the_vocabulary_is_refused_before_the_model_loads(tiny_dir, rows_file, tmp_path,
                                                                         no_model_load):
    with pytest.raises(UserError, match="--guess_k 50000 is beyond the vocabulary"):
        train.main(args(tiny_dir, rows_file, tmp_path / "out", "--guess", "topk", "--guess_k", "50000"))


def edited_model(tiny_dir, tmp_path, value):
    """A copy of the tiny model with one weight of the first layer's attention set to value."""
    init = tmp_path / "init"
    shutil.copytree(tiny_dir, init)
    tensors = load_file(init / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name][0, 0] = value
    save_file(tensors, init / "model.safetensors", metadata={"format": "pt"})
    return str(init)


def test_nan_weights_in_init_are_refused_before_training(tiny_dir, rows_file, tmp_path):
    init = edited_model(tiny_dir, tmp_path, float("nan"))
    with pytest.raises(UserError, match="q_proj.weight hold non-finite values"):
        train.main(args(init, rows_file, tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "checkpoint")


def test_a_non_finite_loss_stops_the_run_and_publishes_nothing(tiny_dir, rows_file, tmp_path):
    """Finite weights whose forward pass overflows (a config or checkpoint gone wrong): the first step's loss is
    not finite; the run stops there, naming the step, and writes nothing."""
    init = edited_model(tiny_dir, tmp_path, 3e38)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"step 1: loss nan, gradient norm nan: not finite.*no checkpoint was saved"):
        train.main(args(init, rows_file, out, "--save_every", "1"))
    assert not out.exists()


def test_an_exploding_run_keeps_the_last_good_checkpoint_and_publishes_nothing(cut_run, tiny_dir, rows_file,
                                                                               tmp_path):
    """Resumed from a good step-2 checkpoint with an absurd --lr: the run stops at the first non-finite loss or
    gradient norm; the step-2 checkpoint is untouched and out_dir holds no model."""
    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    before = tree_hash(out)
    with pytest.raises(UserError, match="not finite.*last checkpoint: step 2 .*untouched; nothing published"):
        train.main(args(tiny_dir, rows_file, out, "--max_steps", "6", "--save_every", "2", "--resume",
                        "--lr", "1e6"))
    assert tree_hash(out) == before


def test_non_finite_weights_are_never_saved(tiny_dir, rows_file, tmp_path):
    """One step whose loss and gradient are finite but whose update is not (RMSprop at --lr 1e38): the save
    refuses it."""
    out = tmp_path / "out"
    with pytest.raises(UserError, match="step 1: the weights hold non-finite values.*no checkpoint was saved yet"):
        train.main(args(tiny_dir, rows_file, out, "--max_steps", "1", "--optimizer", "rmsprop", "--lr", "1e38",
                        "--warmup_ratio", "0"))
    assert not out.exists()


def test_non_finite_optimizer_moments_are_refused_on_resume(cut_run, tiny_dir, rows_file, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    path = out / "checkpoint" / "optimizer.safetensors"
    moments = load_file(path)
    name = next(k for k in moments if k.endswith("exp_avg_sq"))
    moments[name].view(-1)[0] = float("inf")
    save_file(moments, path)
    with pytest.raises(UserError, match=f"optimizer.safetensors: {name} holds non-finite values"):
        train.main(args(tiny_dir, rows_file, out, "--max_steps", "6", "--resume"))


@pytest.mark.parametrize("flags, message", [
    (["--method", "sft"], "other --method: ift, now sft"), (["--seed", "1"], "other --seed"),
    (["--batch_size", "2"], "other examples per step"), (["--max_length", "40"], "other training data"),
    (["--max_steps", "1"], "at step 2, past this run's 1 steps"), ("other_init", "other --init"),
    ("other_data", "other training data")])
def test_resume_refuses_what_it_cannot_continue(flags, message, cut_run, tiny_dir, rows_file, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    before = tree_hash(out)
    init, data = tiny_dir, rows_file
    if flags == "other_init":
        init, flags = shutil.copytree(tiny_dir, tmp_path / "init"), []
    if flags == "other_data":
        data, flags = (write_jsonl(tmp_path / "other.jsonl", chat_rows(32, seed=5)), rows_file[1]), []
    argv = args(str(init), data, out, "--max_steps", "6", "--resume", *flags)
    with pytest.raises(UserError, match=message):
        train.main(argv)
    assert tree_hash(out) == before


def test_resume_with_changed_settings_says_so_and_records_them(cut_run, tiny_dir, rows_file, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(cut_run, out)
    train.main(args(tiny_dir, rows_file, out, "--max_steps", "6", "--save_every", "2", "--resume", "--lr", "5e-4",
                    "--lam", "0.1"))
    assert "resume: changed since the checkpoint: lam 0.2 -> 0.1, lr 0.001 -> 0.0005" in capsys.readouterr().out
    record = json.load(open(out / "train_config.json"))
    assert record["history"] == [{"resumed_at": 2, "changed": {"lam": [0.2, 0.1], "lr": [0.001, 0.0005]}}]
    assert (record["lr"], record["step"], record["world"], record["examples_per_step"]) == (5e-4, 6, 1, 8)


# a run in its own process, as a user starts it (errors.run: one line, no traceback), that signals itself: at a
# chosen step (before its learning rate is set) or in the middle of its second save
SIGNALLER = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
import errors, train
how, argv = sys.argv[1], sys.argv[2:]
lr_at, save = train.lr_at, torch.save

def lr_or_term(step, total, cfg):
    if how == "sigterm_at_step_3" and step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return lr_at(step, total, cfg)

def save_or_interrupt(obj, f, *args, **kw):  # Ctrl-C while resume.pt of the step-4 checkpoint is being written
    if how == "ctrl_c_while_saving" and str(f).endswith("resume.pt") and obj["step"] == 4:
        os.kill(os.getpid(), signal.SIGINT)
    save(obj, f, *args, **kw)

train.lr_at, torch.save = lr_or_term, save_or_interrupt
errors.run(train.main, argv)
"""


@pytest.mark.parametrize("how, line", [
    ("ctrl_c_while_saving", "interrupted after step 4 of 6; last checkpoint: step 4 in "),
    ("sigterm_at_step_3", "terminated (SIGTERM) after step 2 of 6; last checkpoint: step 2 in ")])
def test_ctrl_c_and_sigterm_end_in_one_line_after_the_save_and_resume_exactly(how, line, tiny_dir, rows_file,
                                                                             tmp_path):
    run = args(tiny_dir, rows_file, tmp_path / "out", "--max_steps", "6", "--save_every", "2")
    r = subprocess.run([sys.executable, "-c", SIGNALLER.format(root=ROOT), how, *run], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    assert r.returncode == 130, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(line) and last.endswith("; continue with --resume"), last
    train.main(run + ["--resume"])
    train.main(args(tiny_dir, rows_file, tmp_path / "full", "--max_steps", "6", "--save_every", "2"))
    a, b = weights(tmp_path / "out"), weights(tmp_path / "full")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run differs from the uninterrupted one"


def test_ctrl_c_under_torchrun_is_one_line_and_resumable(tiny_dir, rows_file, tmp_path):
    """Ctrl-C in a terminal signals torchrun and every worker (one process group): the job ends non-zero, our
    message appears once (rank 0), with no traceback from train.py, and --resume continues."""
    out = tmp_path / "out"
    run = args(tiny_dir, rows_file, out, "--max_steps", "200", "--save_every", "2", "--batch_size", "2",
               "--grad_accum", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           os.path.join(ROOT, "train.py"), *run]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    deadline = time.time() + 240
    while not (out / "checkpoint").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    log = stdout + stderr
    assert p.returncode != 0
    assert log.count("interrupted after step") == 1, log[-3000:]
    assert 'train.py", line' not in log, log[-3000:]
    # one process with twice the accumulation: the same examples per step, so the same data position
    train.main(args(tiny_dir, rows_file, out, "--max_steps", "8", "--save_every", "2", "--batch_size", "2",
                    "--grad_accum", "2", "--resume"))
    assert json.load(open(out / "train_config.json"))["step"] == 8


def test_a_refusal_under_torchrun_is_printed_once_without_our_traceback(tiny_dir, rows_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("a week of work")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           os.path.join(ROOT, "train.py"), *args(tiny_dir, rows_file, out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    log = r.stdout + r.stderr
    assert r.returncode != 0
    assert log.count("error: --out_dir") == 1 and "is not empty (notes.txt)" in log, log[-3000:]
    assert 'train.py", line' not in log, log[-3000:]
    assert (out / "notes.txt").read_text() == "a week of work"


# train.py whose second save meets a disk with no room: from then on no file of this process may grow past 1 KB
# (RLIMIT_FSIZE; the OS refuses the writes, EFBIG, as a full disk refuses them with ENOSPC). Only rank 0 writes.
FULL_DISK = """
import os, resource, signal, sys
sys.path.insert(0, {root!r})
import checkpoint, train
from errors import run
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing the process
write, saves = checkpoint.write, []

def write_on_a_full_disk(*args, **kw):
    saves.append(1)
    if len(saves) == 2:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
    return write(*args, **kw)

checkpoint.write = write_on_a_full_disk
run(train.main)
"""


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_save_the_disk_refuses_stops_in_one_line_and_keeps_the_last_checkpoint(nproc, tiny_dir, rows_file,
                                                                                 tmp_path):
    """The step-4 save fails on the disk (real write errors, from safetensors or torch.save): the run stops with
    one line that names the failure and the step-2 checkpoint; that checkpoint is untouched, checkpoint.tmp is
    gone, nothing is published; under torchrun the other rank stops too (no rank left waiting in a barrier).
    --resume then ends with the uninterrupted run's weights."""
    out = tmp_path / "out"
    run = args(tiny_dir, rows_file, out, "--max_steps", "6", "--save_every", "2")
    (tmp_path / "full_disk.py").write_text(FULL_DISK.format(root=ROOT))
    launch = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"] if nproc == 2 else []
    # 2 ranks: each half of the accumulation, the same examples per step; 1 process: this one's thread count
    # (a CPU matmul's rounding can depend on it), so that the steps it computes are bit for bit this process's
    r = subprocess.run([sys.executable, *launch, str(tmp_path / "full_disk.py"), *run,
                        *(["--grad_accum", "1"] if nproc == 2 else [])], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(
                           1 if nproc == 2 else torch.get_num_threads())))
    log = r.stdout + r.stderr
    assert r.returncode != 0
    assert log.count("error: step 4: the checkpoint could not be written (") == 1, log[-3000:]
    assert "File too large" in log and "last checkpoint: step 2 in " in log and "continue with --resume" in log
    assert 'train.py", line' not in log, log[-3000:]
    assert sorted(os.listdir(out)) == ["checkpoint"]
    assert json.load(open(out / "checkpoint" / "train_config.json"))["step"] == 2
    train.main(run + ["--resume"])
    train.main(args(tiny_dir, rows_file, tmp_path / "full", "--max_steps", "6", "--save_every", "2"))
    a, b = weights(out), weights(tmp_path / "full")
    for k in a:  # two ranks sum their gradients where one process accumulates: float rounding apart
        torch.testing.assert_close(a[k], b[k], rtol=0 if nproc == 1 else 1e-5, atol=0 if nproc == 1 else 1e-6)


def test_a_checkpoint_that_cannot_fit_on_the_disk_is_refused_before_training(tiny_dir, rows_file, finished_run,
                                                                             tmp_path, monkeypatch):
    """check_space's estimate is what a save writes (the finished run's checkpoint/, tokenizer files aside), and
    a disk with less free is refused in one line before the first step; out_dir is left as it was."""
    cfg = json.load(open(finished_run / "train_config.json"))
    model = Transformer.from_pretrained(str(finished_run))
    weights_bytes, state_bytes = train.checkpoint_bytes(model, train.TrainConfig(optimizer=cfg["optimizer"]))
    files = {name: os.path.getsize(finished_run / "checkpoint" / name)
             for name in os.listdir(finished_run / "checkpoint")}
    assert abs(files["model.safetensors"] - weights_bytes) <= 0.01 * weights_bytes
    assert abs(files["optimizer.safetensors"] - state_bytes) <= 0.01 * state_bytes
    free = weights_bytes + state_bytes  # less than a checkpoint and its small files
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    monkeypatch.setattr(train, "train_loop", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(UserError, match=r"GB free on its disk, and a checkpoint needs about .* \(weights .*, "
                                        r"optimizer state .*\): free some space"):
        train.main(args(tiny_dir, rows_file, tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_every_file_of_a_checkpoint_reaches_the_disk_before_the_renames(tiny_dir, rows_file, tmp_path, monkeypatch):
    """fsync of each file of checkpoint.tmp and of the folder before checkpoint.tmp becomes checkpoint/, of
    out_dir after each rename and after publishing: a power cut cannot leave names without their bytes."""
    import checkpoint
    events, replace = [], os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))

    def recorded_replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", recorded_replace)
    out = os.path.realpath(tmp_path / "out")
    train.main(args(tiny_dir, rows_file, out, "--max_steps", "2", "--save_every", "1"))
    tmp, ckpt = os.path.join(out, "checkpoint.tmp"), os.path.join(out, "checkpoint")
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[1] == tmp]
    assert len(renames) == 2  # one per save
    start = 0
    for i in renames:
        synced = {e[1] for e in events[start:i] if e[0] == "fsync"}
        assert {os.path.join(tmp, n) for n in os.listdir(ckpt)} | {tmp} <= synced, sorted(synced)
        assert ("fsync", out) in events[i + 1:], "the rename into out_dir was not flushed"
        start = i + 1
    last_link = max(i for i, e in enumerate(events) if e[0] == "replace" and e[2].startswith(out + "/") and
                    os.path.dirname(e[2]) == out and not e[2].endswith(("checkpoint", "checkpoint.old")))
    assert ("fsync", out) in events[last_link + 1:], "publishing was not flushed"


def test_an_out_dir_the_user_cannot_write_is_refused():
    """check_out_dir (train.py's first check) as a user who may not write the parent folder: the suite's own user
    on a read-only folder, or, when the suite runs as root (who may write anywhere), a forked child that became
    the unprivileged user 'nobody' (65534) first. The refusal names the folder; nothing is created."""
    import checkpoint
    import tempfile
    parent = tempfile.mkdtemp()  # in /tmp, which every user can reach
    os.chmod(parent, 0o555)
    out = os.path.join(parent, "run", "out")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, try, report through the pipe, exit without running pytest's cleanup
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            try:
                checkpoint.check_out_dir(out, False)
                said = "accepted"
            except UserError as e:
                said = str(e)
            os.write(write, said.encode())
        finally:
            os._exit(0)
    os.close(write)
    said = os.read(read, 4096).decode()
    os.waitpid(pid, 0)
    os.chmod(parent, 0o755)
    try:
        assert said == f"--out_dir {out}: no permission to write there", said
        assert os.listdir(parent) == []
    finally:
        shutil.rmtree(parent)
