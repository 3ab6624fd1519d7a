"""
train.py's checkpoints, and how they survive a crash, a Ctrl-C or a kill at any point.

out_dir/checkpoint/ holds the latest complete resumable state: the weights as a Hugging Face model directory,
the optimizer's moments (optimizer.safetensors), the step and RNG state (resume.pt) and the run's settings
(train_config.json). A save never touches it before the new state is complete:

    1. write checkpoint.tmp/                    a crash here: checkpoint/ is as it was; .tmp is rubbish
    2. rename checkpoint/ -> checkpoint.old/    a crash after 2: .old is the latest complete state
    3. rename checkpoint.tmp/ -> checkpoint/
    4. remove checkpoint.old/                   a crash before or during 4: checkpoint/ is complete; .old rubbish
    5. the final save only, publish: hard-link the checkpoint's model files into out_dir itself, each swapped in
       atomically, train_config.json last (out_dir is a whole model once it holds the final step's)

recover() returns out_dir to one state from any of those points; it runs before every save and on --resume, and
--resume of a run whose last save was cut short in step 5 publishes again. Nothing outside these names is ever
written or removed: train.py refuses an out_dir that holds anything else (check_out_dir).

The files of step 1 reach the disk (fsync) before step 2 renames anything, and each rename and link is flushed
with its folder: after a power cut too, the latest checkpoint's names hold its bytes. A save that fails (a full
disk, a folder gone) leaves the last complete checkpoint as it was and removes checkpoint.tmp; check_space refuses
at the start a run whose checkpoint could not fit.
"""
import json
import os
import shutil

import torch

from errors import UserError
from hf_checkpoint import local, read_into

OWN = ("checkpoint", "checkpoint.old", "checkpoint.tmp")
STATE = ("resume.pt", "optimizer.safetensors", "train_config.json")  # a checkpoint is complete when it has all three


def complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name)) for name in STATE)


def find_checkpoint(out_dir: str) -> str | None:
    """The latest complete checkpoint in out_dir (read only): checkpoint/, or .old after a crash between the two
    renames; None when there is none."""
    for name in OWN[:2]:
        if complete(os.path.join(out_dir, name)):
            return os.path.join(out_dir, name)
    return None


def saved_config(path: str) -> dict:
    with open(os.path.join(path, "train_config.json")) as f:
        return json.load(f)


def recover(out_dir: str) -> str | None:
    """Finish or undo whatever save a crash cut short (see the module docstring); the complete checkpoint or None.
    One process only (rank 0), while no save is running."""
    ckpt, old, tmp = (os.path.join(out_dir, name) for name in OWN)
    if not os.path.exists(ckpt) and complete(old):  # cut between steps 2 and 3
        os.replace(old, ckpt)
    shutil.rmtree(tmp, ignore_errors=True)  # never the latest complete state: step 3 renames it first
    if complete(ckpt):
        shutil.rmtree(old, ignore_errors=True)
        return ckpt
    return None


def existing(path: str) -> str:
    """path, or its nearest ancestor that exists."""
    while not os.path.exists(path):
        path = os.path.dirname(os.path.abspath(path))
    return path


def writable(path: str) -> bool:
    """Whether path (a folder that may not exist yet) can be created or written: its nearest existing ancestor."""
    path = existing(path)
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def check_space(out_dir: str, weights: int, state: int, other: int = 100 * 2**20):
    """Refuse a run whose checkpoint would not fit beside what out_dir's disk holds: each save writes a whole new
    checkpoint (weights and optimizer state, in bytes; other: tokenizer and small files) before it removes the
    old one, so that much must be free from the start."""
    free, need = shutil.disk_usage(existing(out_dir)).free, weights + state + other
    if free < need:
        raise UserError(f"--out_dir {out_dir}: {free / 1e9:.2f} GB free on its disk, and a checkpoint needs about "
                        f"{need / 1e9:.2f} GB (weights {weights / 1e9:.2f}, optimizer state {state / 1e9:.2f}): free "
                        "some space or choose another --out_dir")


def sync(path: str):
    """Flush a file's bytes, or a folder's entries (the names renamed or linked into it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_out_dir(out_dir: str, resume: bool, init_dir: str | None = None) -> str | None:
    """Refuse, in one line, any out_dir train.py could not write without losing something: a file, a folder it
    cannot write, one that holds files it did not make (a finished model, another tool's output) or the --init
    model itself. Returns the checkpoint to resume (resume=True) or None."""
    if not out_dir:
        raise UserError("--out_dir is empty")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file, not a folder")
    if not writable(out_dir):
        raise UserError(f"--out_dir {out_dir}: no permission to write there")
    if init_dir and os.path.exists(out_dir):
        real_out, real_init = os.path.realpath(out_dir), os.path.realpath(init_dir)
        if real_init == real_out or real_init.startswith(real_out + os.sep):
            raise UserError(f"--out_dir {out_dir} holds the --init model {init_dir}: train.py would write over it; "
                            "choose another --out_dir")
    ckpt = find_checkpoint(out_dir)
    if resume:
        if ckpt is None:
            raise UserError(f"--resume: no checkpoint in {out_dir}" + (
                " (checkpoint/ is incomplete: it lacks one of " + ", ".join(STATE) + ")"
                if os.path.isdir(os.path.join(out_dir, "checkpoint")) else ""))
        return ckpt
    if ckpt:
        raise UserError(f"{out_dir} holds a checkpoint at step {saved_config(ckpt)['step']}; pass --resume (or "
                        "--auto_resume) to continue it, or choose another --out_dir")
    others = sorted(set(os.listdir(out_dir)) - {"checkpoint.tmp"}) if os.path.isdir(out_dir) else []
    if others:
        raise UserError(f"--out_dir {out_dir} is not empty ({', '.join(others[:4])}{', ...' if others[4:] else ''})"
                        ": train.py writes only into a new or empty folder, or continues its own with --resume")
    return None


def write(out_dir: str, save_model, osd: dict, step: int, config: dict, final: bool):
    """Steps 1-5 of the module docstring: save_model(folder) writes the model's files (a Hugging Face model, or
    under LoRA peft's adapter files), osd is the full (gathered) optimizer state dict. One process."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    recover(out_dir)
    ckpt, old, tmp = (os.path.join(out_dir, name) for name in OWN)
    try:
        save_model(tmp)
        # the optimizer's moments as safetensors (a resumed rank reads only its rows of them), named
        # "<parameter>.<moment>"; step and RNG in resume.pt, loadable with torch.load(weights_only=True)
        save_file({f"{fqn}.{k}": v.contiguous() for fqn, moments in osd["state"].items() for k, v in moments.items()},
                  os.path.join(tmp, "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.stack([s for s in torch.cuda.get_rng_state_all()])
        torch.save({"step": step, "rng": rng}, os.path.join(tmp, "resume.pt"))
        with open(os.path.join(tmp, "train_config.json"), "w") as f:
            json.dump(dict(config, step=step), f, indent=2)
        for name in os.listdir(tmp):
            sync(os.path.join(tmp, name))
        sync(tmp)
    except BaseException:  # step 1 failed (a full disk, say) or was cut: the rubbish goes, checkpoint/ stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(ckpt):
        os.replace(ckpt, old)
    os.replace(tmp, ckpt)
    sync(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    if final:
        publish(ckpt, out_dir)


def publish(ckpt: str, out_dir: str):
    """Step 5: out_dir itself becomes the model (hard links: no copy of the weights), train_config.json last."""
    names = sorted(set(os.listdir(ckpt)) - {"resume.pt", "optimizer.safetensors", "train_config.json"})
    for name in names + ["train_config.json"]:
        src, dst, link = os.path.join(ckpt, name), os.path.join(out_dir, name), os.path.join(out_dir, name + ".tmp")
        if os.path.exists(link):
            os.remove(link)
        if os.path.exists(dst) and os.path.samefile(src, dst):  # published before a crash cut the rest short
            continue  # (and renaming a link onto its twin would do nothing, leaving the link behind)
        os.link(src, link)
        os.replace(link, dst)
    sync(out_dir)


def published(ckpt: str, out_dir: str) -> bool:
    """Whether out_dir holds the checkpoint's model (the same files: publish links them)."""
    path = os.path.join(out_dir, "train_config.json")
    return os.path.exists(path) and os.path.samefile(path, os.path.join(ckpt, "train_config.json"))


def load_state(path: str, model, optimizer, optimizer_name: str) -> int:
    """Optimizer state, step and RNG of a checkpoint (its weights were loaded with the model); returns the step.
    Each moment is allocated like its parameter (sharded under FSDP) and filled from optimizer.safetensors with
    only the rows this rank keeps: no rank ever holds the whole state, and no zero-initialized copy is made first."""
    from safetensors import safe_open
    saved = saved_config(path)["optimizer"]
    if saved != optimizer_name:
        raise UserError(f"{path} was trained with --optimizer {saved}; resume with the same optimizer")
    file = os.path.join(path, "optimizer.safetensors")
    params = dict(model.named_parameters())
    with safe_open(file, framework="pt") as f:  # names "<parameter>.<moment>"; 0-dim ones are step counters
        moments = {name: torch.empty_like(params[name.rsplit(".", 1)[0]]) if f.get_slice(name).get_shape()
                   else f.get_tensor(name) for name in f.keys()}
    read_into(moments, dict.fromkeys(moments, file))
    bad = [name for name, t in moments.items() if not torch.isfinite(local(t)).all()]
    if bad:
        raise UserError(f"{file}: {bad[0]} holds non-finite values (inf or nan): this optimizer state cannot be "
                        "resumed; its weights load as --init, without --resume")
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    osd = optimizer.state_dict()  # param_groups with this run's hyperparameters; state filled in below
    for name, t in moments.items():
        fqn, moment = name.rsplit(".", 1)
        osd["state"].setdefault(index[id(params[fqn])], {})[moment] = t
    if len(osd["state"]) != len(index):
        raise UserError(f"{file} lacks the state of {len(index) - len(osd['state'])} parameters")
    optimizer.load_state_dict(osd)
    state = torch.load(os.path.join(path, "resume.pt"), map_location="cpu", weights_only=True)
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["rng"]["cuda"]))
    return state["step"]

