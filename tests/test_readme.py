"""The README's Quick start runs as written: every command of its fenced code blocks, in order, in a fresh copy of
the repository, at tiny sizes where a flag allows. An edit that breaks a command (a wrong flag, a path that a
command before it does not write, an --out_dir that meets an earlier run's checkpoint) fails here."""
import os
import re
import shlex
import shutil
import subprocess
import sys

from conftest import ROOT

# what makes each script small; appended after the README's own flags, so these win (argparse keeps the last).
# A script not listed here fails the test: add its tiny flags before putting it in the Quick start.
TINY = {
    "train.py": ["--max_steps", "2", "--eval_every", "0", "--sample_every", "0", "--batch_size", "2",
                 "--max_length", "64"],
    "sample.py": ["--max_new_tokens", "4"],
    "eval.py": ["--limit", "2", "--max_new_tokens", "8"],
}
NPROC = 2  # torchrun's --nproc_per_node here: the CI machine has 2 cores
# not run: they build the environment this test already runs in (pip), or they are this suite (pytest)
SKIP = (("pip",), ("python", "-m", "pytest"))


def quick_start_blocks(readme: str) -> list[str]:
    """The fenced code blocks between the '## Quick start' heading and the next '## ' heading."""
    m = re.search(r"^## Quick start\s*$(.*?)(?=^## )", readme, re.M | re.S)
    assert m, "the README has no '## Quick start' section followed by another '## ' section"
    return re.findall(r"^```[a-z]*\n(.*?)^```", m.group(1), re.M | re.S)


def quick_start_commands(readme: str) -> list[list[str]]:
    """Each command of the blocks as argv lists, in order: lines joined at a trailing backslash, comments dropped,
    a line split at '&&', the pip and pytest parts left out."""
    commands = []
    for block in quick_start_blocks(readme):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                part, words = words[:cut], words[cut + 1:]
                if part and not any(tuple(part[:len(s)]) == s for s in SKIP):
                    commands.append(part)
    return commands


def runnable(argv: list[str]) -> list[str]:
    """A README command as this test runs it: this interpreter, torchrun through torch.distributed.run with NPROC
    processes on a free port, the script's tiny flags appended."""
    if argv[0] == "torchrun":
        script_at = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        launcher, given = [], iter(argv[1:script_at])
        for a in given:  # drop the README's process count, "--nproc_per_node=4" or "--nproc_per_node 4"
            if a.replace("-", "_") == "__nproc_per_node":
                next(given, None)
            elif not a.replace("-", "_").startswith("__nproc_per_node="):
                launcher.append(a)
        head = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={NPROC}",
                *([] if "--standalone" in launcher else ["--standalone"]), *launcher]
        argv = argv[script_at:]
    else:
        assert argv[0] in ("python", "python3"), f"a Quick start command this test cannot run: {shlex.join(argv)}"
        head, argv = [sys.executable], argv[1:]
    script = argv[0]
    assert script in TINY, f"{script} has no tiny flags in tests/test_readme.py's TINY: add them"
    return head + argv + TINY[script]


def fresh_copy(dst: str) -> str:
    """The repository's files without its outputs, environments and caches; checkpoints/ linked (the converted
    default model that the smollm2_dir fixture makes)."""
    skip_top = {".git", ".venv", "checkpoints", "runs", ".pytest_cache"}

    def ignore(folder, names):
        top = os.path.abspath(folder) == ROOT
        return [n for n in names if n == "__pycache__" or (top and (n in skip_top or n.startswith("out")))]

    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)
    os.symlink(os.path.join(ROOT, "checkpoints"), os.path.join(dst, "checkpoints"))
    return dst


def out_dir(argv: list[str]) -> str | None:
    """The folder a train.py command writes: its last --out_dir, else train.py's default."""
    if not any(a.endswith("train.py") for a in argv):
        return None
    given = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out_dir"]
    given += [a.split("=", 1)[1] for a in argv if a.startswith("--out_dir=")]
    return given[-1] if given else "out"


def finished(made: set, later: list[list[str]]) -> list[str]:
    """The output folders in made that no later command names (as --init, --out_dir, ...) or writes into."""
    return [f for f in made if f and not any(f in c or out_dir(c) == f for c in later)]


def test_parser_reads_blocks_lines_and_chains():
    readme = ("# x\n\n## Quick start\n\n```sh\npip install -r requirements.txt && python train.py\n```\n\n"
              "text `python not_run.py`\n\n    python indented_not_run.py\n\n```\n"
              "python -m pytest -q tests\npython sample.py --prompt \"a # b\"  # a comment\n"
              "torchrun --nproc_per_node=4 train.py \\\n    --method sft\n```\n\n## Next\n\n```\npython x.py\n```\n")
    assert quick_start_commands(readme) == [
        ["python", "train.py"], ["python", "sample.py", "--prompt", "a # b"],
        ["torchrun", "--nproc_per_node=4", "train.py", "--method", "sft"]]
    assert runnable(["torchrun", "--nproc_per_node=4", "train.py"])[:6] == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "train.py"]
    assert out_dir(["python", "train.py", "--out_dir", "a", "--method", "sft"]) == "a"
    assert out_dir(["python", "train.py"]) == "out" and out_dir(["python", "eval.py"]) is None
    later = [["python", "eval.py", "--init", "out"], ["python", "train.py", "--out_dir", "b"]]
    assert finished({"out", "a", "b", None}, later) == ["a"]  # out is read later, b written later
    assert finished({"out"}, [["torchrun", "train.py"]]) == []  # a later run into out must meet its checkpoint


def test_quick_start_commands_run_in_order(smollm2_dir, tmp_path):
    commands = quick_start_commands(open(os.path.join(ROOT, "README.md")).read())
    assert commands and commands[0][:2] == ["python", "train.py"], commands  # the first command trains
    assert any(c[0] == "torchrun" for c in commands), commands
    work = fresh_copy(str(tmp_path / "repo"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    made = set()
    for i, argv in enumerate(commands):
        r = subprocess.run(runnable(argv), cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"README command {shlex.join(argv)} exited {r.returncode}:\n" + \
            r.stdout[-3000:] + r.stderr[-3000:]
        # an output that no later command names or writes into is removed at once: each holds a 135M model and
        # its optimizer state (about 1.1 GB). One a later command writes into stays, so that the refusal to start
        # over a checkpoint still fails this test
        made.add(out_dir(argv))
        for folder in finished(made, commands[i + 1:]):
            shutil.rmtree(os.path.join(work, folder), ignore_errors=True)
            made.discard(folder)
