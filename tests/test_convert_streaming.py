"""Official action-model files are memory-mapped when torch.save's zip format allows (issue 20:
the official dp-*.pt also carries the 6 GB video model, which the loader ignores and so must
not read), and legacy (non-zip) files are still read whole."""

from __future__ import annotations

import torch

from vpp_edge.training import checkpoints as ckpt


def _file_backed(tensor: torch.Tensor, path) -> bool:
    """Whether ``tensor``'s data lies in a memory mapping of ``path`` (Linux /proc/self/maps)."""
    ptr = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= ptr < high:
                return True
    return False


def _state():
    return {"Video_Former.w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "TVP_encoder.pipeline.unet.conv_in.weight": torch.ones(4)}


def test_zip_file_is_memory_mapped(tmp_path):
    path = tmp_path / "dp-new.pt"
    torch.save({"model": _state()}, path)
    state = ckpt.read_torch_weights(path)
    assert torch.equal(state["Video_Former.w"], _state()["Video_Former.w"])
    # The tensors' data lie in a mapping of the file, not in allocations of their own.
    assert _file_backed(state["Video_Former.w"], path)
    assert _file_backed(state["TVP_encoder.pipeline.unet.conv_in.weight"], path)


def test_legacy_file_is_read_whole(tmp_path):
    path = tmp_path / "dp-old.pt"
    torch.save({"model": _state()}, path, _use_new_zipfile_serialization=False)
    state = ckpt.read_torch_weights(path)
    assert torch.equal(state["Video_Former.w"], _state()["Video_Former.w"])
    assert not _file_backed(state["Video_Former.w"], path)
