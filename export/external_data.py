"""Precision passes on ONNX graphs whose weights live in external data, within bounded memory.

A paper-scale TVP graph holds about 6 GB of FP32 weights. Loading it whole (``onnx.load``)
and converting it in memory held the weights two or three times over (the kernel killed
the export at 21 GB on a 24 GB machine). Here a pass loads only the graph (the weights stay
where they are, as external-data references), rewrites the graph, and then streams the
weights from the source data file to the destination data file one tensor at a time: the
memory a pass holds is the graph plus the largest single tensor.

Graphs without external data (the small ones) take the same path: their weights are inline
in the graph and are converted in place, as before.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

log = logging.getLogger(__name__)

# Offsets of tensors in the data files we write are multiples of this (a page): ONNX Runtime
# and TensorRT may memory-map external data, which needs page-aligned offsets.
ALIGNMENT = 4096


def load_graph(path: Path) -> onnx.ModelProto:
    """The model at ``path`` without its external data (weights beyond the graph file stay on disk)."""
    return onnx.load(str(path), load_external_data=False)


def external_initializers(model: onnx.ModelProto) -> dict[str, int]:
    """Name -> ONNX data type of the main graph's initializers stored as external data.

    Subgraphs (If/Loop bodies) with external initializers are refused: torch's exporter
    does not produce them and the streaming writer below would miss them."""
    for node in model.graph.node:
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.type in (onnx.AttributeProto.GRAPH,
                                                               onnx.AttributeProto.GRAPHS) else []:
                if any(uses_external_data(t) for t in sub.initializer):
                    raise ValueError(f"node '{node.name}': subgraph initializers in external data are not supported")
    return {t.name: t.data_type for t in model.graph.initializer if uses_external_data(t)}


def _read(files: dict[Path, BinaryIO], path: Path, info: ExternalDataInfo, dtype: np.dtype, count: int) -> np.ndarray:
    """One tensor from an external-data file (a plain read: unlike a memory map, the pages
    read do not stay in this process's resident memory)."""
    f = files.get(path)
    if f is None:
        f = files[path] = open(path, "rb")  # noqa: SIM115 (closed by the caller)
    f.seek(info.offset or 0)
    arr = np.fromfile(f, dtype=dtype, count=count)
    if arr.size != count or (info.length and info.length != arr.nbytes):
        raise ValueError(f"{path}: tensor '{info.location}'@{info.offset} is {arr.nbytes} bytes, "
                         f"expected {info.length or count * dtype.itemsize}")
    return arr


def stream_external_data(model: onnx.ModelProto, src_dir: Path, source_types: dict[str, int], dst: Path,
                         convert: Callable[[np.ndarray, int], np.ndarray],
                         progress: Callable[[int], None] | None = None) -> int:
    """Write the external tensors of ``model`` (whose references point into ``src_dir``) to
    ``<dst>.data``, one at a time, and point the references there.

    ``source_types``: each external tensor's data type in the source files (a graph pass may
    have changed the declared type already, e.g. FP32 -> FP16); ``convert(array, target_type)``
    turns the source array into the declared type. Returns the bytes written."""
    data_name = f"{dst.name}.data"
    files: dict[Path, BinaryIO] = {}
    written = 0
    try:
        with open(dst.parent / data_name, "wb") as out:
            for tensor in model.graph.initializer:
                if tensor.name not in source_types:
                    continue
                info = ExternalDataInfo(tensor)
                src_type = onnx.helper.tensor_dtype_to_np_dtype(source_types[tensor.name])
                count = int(np.prod(tensor.dims, dtype=np.int64))
                arr = convert(_read(files, src_dir / info.location, info, src_type, count), tensor.data_type)
                expected = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
                if arr.dtype != expected:
                    raise ValueError(f"tensor '{tensor.name}': converted to {arr.dtype}, graph declares {expected}")
                out.write(b"\0" * (-out.tell() % ALIGNMENT))
                offset = out.tell()
                arr.tofile(out)
                del tensor.external_data[:]
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                tensor.data_location = onnx.TensorProto.EXTERNAL
                written += arr.nbytes
                if progress:
                    progress(arr.nbytes)
    finally:
        for f in files.values():
            f.close()
    return written


def to_float16(arr: np.ndarray, target_type: int) -> np.ndarray:
    """FP32 -> FP16 as ONNX Runtime's converter does it for inline weights (magnitudes below
    FP16's smallest subnormal and above its largest finite value are clamped, not flushed
    to 0 or inf), other tensors unchanged."""
    from onnxruntime.transformers.float16 import convert_np_to_float16

    if target_type == onnx.TensorProto.FLOAT16 and arr.dtype == np.float32:
        return convert_np_to_float16(arr)
    return arr


def _value_info(tensor: onnx.TensorProto) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


def convert_fp16(src: Path, dst: Path, keep_fp32_ops: Sequence[str],
                 graph_fixes: Sequence[Callable[[onnx.GraphProto], None]] = (),
                 progress: Callable[[int], None] | None = None) -> None:
    """FP16 weights and activations, FP32 inputs/outputs, ``keep_fp32_ops`` in FP32, of the
    graph at ``src`` into ``dst`` (with ``<dst>.data`` when ``src`` has external data).

    ONNX Runtime's converter rewrites the graph loaded without its weights: it marks an
    external FP32 initializer FP16 without touching the data (it has none to touch), and
    the data follow tensor by tensor. ``graph_fixes`` run on the converted graph before it
    is saved."""
    from unittest import mock

    from onnxruntime.transformers import float16

    from .onnx_io import check, quiet_tools

    model = load_graph(src)
    source_types = external_initializers(model)
    # The converter reads each converted initializer's data (numpy_helper.to_array) only to
    # learn its shape; the shape is in the tensor's dims, and the data are not loaded here.
    with quiet_tools(), mock.patch.object(float16, "make_value_info_from_tensor", _value_info):
        model16 = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=list(keep_fp32_ops),
                                                   disable_shape_infer=False)
    del model
    for fix in graph_fixes:
        fix(model16.graph)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if source_types:
        stream_external_data(model16, src.parent, source_types, dst, to_float16, progress)
        onnx.save(model16, str(dst))  # the graph only: every external reference now points at <dst>.data
    else:
        large = model16.ByteSize() >= 2**31
        onnx.save(model16, str(dst), save_as_external_data=large, location=f"{dst.name}.data" if large else None)
    check(dst)
