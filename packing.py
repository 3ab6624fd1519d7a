"""
Packing (train.py --pack): the examples of a micro-batch laid end to end in one row, with no padding, and put
back into the padded batch before any loss is reduced. So packing changes what is computed, never the result.

    padded (B, T):  [a a a a . . .]      packed (1, L):  [a a a a b b c c c c c c]
                    [b b . . . . .]      lengths (4, 2, 6), positions 0 1 2 3 0 1 0 1 2 3 4 5
                    [c c c c c c .]      each example attends to itself only, causally

Three things must restart at every example boundary, or one conversation leaks into another:
- attention: each example sees only its own earlier tokens (model.attend_packed, the one place that knows);
- positions (RoPE): 0, 1, 2, ... again for each example (Packing.positions);
- everything IFT and the preference losses compute along a sequence: the guesses' shift (ift_forward keeps
  each example's first token, where the shift would bring the previous example's last guess), the propagation's
  discounted sums and the per-example means. Those run after Packing.unpack, on the padded (B, T) layout the
  same examples make without --pack: the reductions there are the unpacked ones, quirks included (the
  right-side propagation variants look at the whole batch).

One row of the summed length, not rows of a token budget: attention is computed per example, so a long row costs
nothing quadratic, and the examples of a micro-batch stay exactly those of the unpacked run (--batch_size counts
examples either way).
"""
from dataclasses import dataclass, replace

import torch

from data import collate


@dataclass(frozen=True)
class Packing:
    """How a micro-batch was packed: lengths (Python ints, one per example, summing to the row's length L),
    cu (N+1,) int32 offsets of the examples in the row, positions (L,) restarting at 0 per example, layout (L,)
    the flat index of each packed position in the padded (B, T) batch, targets (B, T) that batch's targets.
    window: the sliding window of the layer being run (model.py sets it per layer), None for full attention."""
    lengths: tuple
    cu: torch.Tensor
    positions: torch.Tensor
    layout: torch.Tensor
    targets: torch.Tensor
    window: int | None = None

    def unpack(self, t: torch.Tensor) -> torch.Tensor:
        """A per-position tensor of the packed row (1, L) -> the padded batch's (B, T), 0 at padding (where the
        unpacked heads put 0 too); differentiable."""
        out = t.new_zeros(self.targets.numel())
        return out.index_put((self.layout,), t[0]).view(self.targets.shape)

    def with_window(self, window: int | None) -> "Packing":
        return replace(self, window=window)

    def to(self, device, move=None) -> "Packing":
        """On device; move(t, device) moves each tensor (train.to_device: pinned, non-blocking), else t.to."""
        move = move or (lambda t, d: t.to(d))
        return replace(self, cu=move(self.cu, device), positions=move(self.positions, device),
                       layout=move(self.layout, device), targets=move(self.targets, device))


def collate_packed(examples, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, Packing]:
    """The examples (ids, mask) end to end: x, y (1, L) and their Packing. x and y are data.collate's padded
    batch with the padding taken out, row by row, so the answer positions come in the same order in both."""
    x_pad, y_pad = collate(examples, pad_id)  # (B, T)
    T = x_pad.size(1)
    lengths = tuple(len(ids) - 1 for ids, _ in examples)  # an example of n + 1 tokens has n input positions
    layout = torch.cat([b * T + torch.arange(n) for b, n in enumerate(lengths)])
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor((0, *lengths)).cumsum(0).to(torch.int32)
    packing = Packing(lengths, cu, positions, layout, y_pad)
    return x_pad.flatten()[layout][None], y_pad.flatten()[layout][None], packing
