"""sample.py prints a streamed continuation; --chat prints only the answer."""
import pytest

import sample
from errors import UserError


def test_chat_answer_streams(smollm2_dir, capsys):
    sample.main(["--init", smollm2_dir, "--chat", "--prompt", "What is the capital of France?",
                 "--temperature", "0", "--max_new_tokens", "20"])
    out = capsys.readouterr().out
    assert "Paris" in out and "<|im_start|>" not in out and "What is the capital" not in out


def test_plain_continuation_is_seeded(smollm2_dir, capsys):
    argv = ["--init", smollm2_dir, "--prompt", "Once upon a time", "--max_new_tokens", "12", "--top_k", "50",
            "--top_p", "0.9", "--seed", "3"]
    sample.main(argv)
    first = capsys.readouterr().out
    sample.main(argv)
    assert capsys.readouterr().out == first and first.startswith("Once upon a time") and len(first) > 20
    others = set()
    for seed in ("4", "5"):  # and the seed is what decides it
        sample.main(argv[:-1] + [seed])
        others.add(capsys.readouterr().out)
    assert first not in others


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not a checkpoint directory"):  # one line under errors.run
        sample.main(["--init", str(tmp_path / "nothing"), "--prompt", "hi"])


def test_compiled_decoding_prints_the_eager_text(tiny_tied_dir, capsys, compile_counter):
    """--compile_decode (the CUDA default) streams the same text as --no-compile_decode (the CPU default), greedy and
    seeded sampling alike, through the compiled step."""
    for extra in (["--temperature", "0"], ["--top_k", "50", "--seed", "3"]):
        out = {}
        for flag in ("--no-compile_decode", "--compile_decode"):
            sample.main(["--init", tiny_tied_dir, "--prompt", "Once upon a time", "--max_new_tokens", "16", flag,
                         *extra])
            out[flag] = capsys.readouterr().out
        assert out["--compile_decode"] == out["--no-compile_decode"] and len(out["--compile_decode"]) > 20
    assert compile_counter.frame_count == 1  # the compiled step ran, one graph for both runs
