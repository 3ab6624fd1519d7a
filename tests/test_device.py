"""One --device rule for every script (model.pick_device): "auto" is cuda when torch sees one, else cpu; decoding
weights in bf16 on CUDA. Checked without a GPU by faking torch.cuda.is_available."""
import pytest
import torch

import bench
import compare
import eval as evaluation
import sample
import train
from errors import UserError
from model import Transformer, decoding_dtype, pick_device


class Loaded(Exception):
    pass


@pytest.fixture
def loads(monkeypatch):
    """Record the (device, dtype) every script asks from_pretrained for, and stop there."""
    calls = []

    def fake(cls, path, dtype=None, device=None, shard=None):
        calls.append((torch.device(device).type, dtype))
        raise Loaded

    monkeypatch.setattr(Transformer, "from_pretrained", classmethod(fake))
    return calls


@pytest.mark.parametrize("cuda", [True, False])
def test_auto_picks_cuda_when_there_is_one(cuda, monkeypatch, loads, smollm2_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    want = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    assert (pick_device("auto").type, decoding_dtype(pick_device("auto"))) == want
    assert pick_device("cpu").type == "cpu"
    # every script defaults to auto and loads through the rule
    assert train.TrainConfig().device == evaluation.EvalConfig().device == bench.parse_args([]).device == "auto"
    with pytest.raises(RuntimeError):  # eval.load_checkpoint wraps the loader's error with the path
        evaluation.load_checkpoint(smollm2_dir)
    with pytest.raises(Loaded):
        sample.main(["--init", smollm2_dir])
    with pytest.raises(RuntimeError):  # compare.py scores through eval with its own --device, default auto
        compare.score(smollm2_dir, [], compare.parse_args([])[0])
    assert loads == [want] * 3


def test_cuda_asked_for_without_one_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: no CUDA device"):
        pick_device("cuda")
    with pytest.raises(UserError, match="no CUDA device"):
        sample.main(["--device", "cuda"])
