"""AOTInductor packages of quantized models: int8 oneDNN GEMMs where layers are quantized, bf16 elsewhere.

`compile_package` exports a model holding `QLinear` layers (and plain float layers) with
`torch.export`, lowers it with Inductor (freezing on, so that the int8 patterns written by
`quant.kernels.decomposed_linear` become `onednn.qlinear_pointwise` on prepacked weights, with
GELU, residual adds and the next layer's quantization fused in) and writes an AOTInductor `.pt2`
that `torch._inductor.aoti_load_package` runs without the Python model code. `compile_model` is
the same lowering in-process (torch.compile).

    >>> path = compile_package(qmodel, entry.example_inputs(2), "out/model.pt2")
    >>> runner = torch._inductor.aoti_load_package(str(path))
    >>> token_states = runner(input_ids, attention_mask)[0]
"""

from __future__ import annotations

import copy
import io
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from modelpress.core.atomic import atomic_path
from modelpress.core.environment import cpu_info, int8_signed_native
from modelpress.export.onnx_graph import ExportWarning
from modelpress.quant import kernels
from modelpress.quant.modules import QLinear


class TracedQLinear(nn.Module):
    """A `QLinear` in the form Inductor lowers to an int8 GEMM (inference only).

    Integer weights and scales are frozen parameters (torch.compile's freezing inlines parameters,
    not buffers) and a static layer's activation scale and zero point are Python numbers.
    """

    def __init__(self, q: QLinear) -> None:
        super().__init__()
        self.weight_scheme, self.act = q.weight_scheme, q.act
        self.in_features, self.out_features = q.in_features, q.out_features
        for name in ("weight_q", "weight_scale", "weight_zero_point", "bias"):
            value = getattr(q, name)
            self.register_parameter(name, None if value is None else nn.Parameter(value.clone(), requires_grad=False))
        self.act_qparams: tuple[float, int] | None = None
        if q.act.mode == "static":
            self.act_qparams = (float(q.act_scale), int(q.act_zero_point))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = kernels.decomposed_linear(self, x, self.act_qparams)
        assert out is not None, "TracedQLinear is built only for layers with an int8 pattern"
        return out


def prepare(model: nn.Module, bf16: bool = True) -> nn.Module:
    """A private inference copy of `model` ready for lowering (the user's model is never touched).

    Int8 `QLinear` layers become `TracedQLinear`; with `bf16`, every other floating parameter and
    buffer is cast to bf16 (quantization scales stay fp32); floating outputs are cast to float32.
    """
    module = copy.deepcopy(model).eval()
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QLinear) and kernels.decomposed_linear_applies(child):
                setattr(parent, name, TracedQLinear(child))
    if bf16:
        for sub in module.modules():
            if isinstance(sub, (QLinear, TracedQLinear)):
                continue
            for p in sub.parameters(recurse=False):
                if p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
            for name, b in sub.named_buffers(recurse=False):
                if b.is_floating_point():
                    setattr(sub, name, b.to(torch.bfloat16))
    for p in module.parameters():
        p.requires_grad_(False)
    # A hook, not a wrapper: the traced signature (input names) stays the model's own.
    module.register_forward_hook(_outputs_to_float32)
    if bf16:  # float inputs (images, audio, recurrent state) meet bf16 weights
        module.register_forward_pre_hook(_inputs_to_bf16)
    return module


# Inductor's C++ GEMM templates (AMX int8 micro-kernels with fused epilogues), benchmarked against
# oneDNN per GEMM at compile time: MiniLM batch 1 ~15% faster, batch 32 unchanged, compile ~2x longer.
AUTOTUNE_CONFIGS: dict[str, Any] = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def choose_lowering(pt2_float: str = "auto", int8_sources: str = "auto") -> dict[str, Any]:
    """The .pt2 lowering for this CPU: `bf16` float ops and `signed_int8` GEMM sources, with the reason.

    "auto" picks per capability: bf16 float ops where the CPU has bf16 dot products (AMX or
    AVX-512 BF16; elsewhere bf16 is converted around every op and runs slower than fp32), signed
    int8 sources only on AMX (see `PostGradPasses`). An explicit choice this CPU cannot run fast is
    refused with the missing feature named (`BadInputError`, exit 2).
    """
    from modelpress.core.environment import require_feature

    info = cpu_info()
    if pt2_float == "bf16" and info["bf16"] == "none":
        require_feature("avx512_bf16", "bf16 float ops in the .pt2 (lowering pt2_float: bf16)")
    if int8_sources == "signed":
        require_feature("amx_int8", "the signed-source int8 GEMM lowering (int8_sources: signed)")
    bf16 = pt2_float == "bf16" or (pt2_float == "auto" and info["bf16"] != "none")
    signed = int8_sources == "signed" or (int8_sources == "auto" and int8_signed_native())
    return {
        "bf16": bf16,
        "signed_int8": signed,
        "why": f"CPU int8 unit {info['int8']}, bf16 unit {info['bf16']}"
        + (f" (capped at {info['onednn_max_isa']})" if info["onednn_max_isa"] else ""),
    }


def inductor_configs(
    extra: dict[str, Any] | None = None, autotune: bool = False, signed_int8: bool | None = None
) -> dict[str, Any]:
    """Inductor settings of the int8 lowering: freezing (weights become constants, int8 patterns are
    prepacked at compile time), `SizesFromInputs`, `SplitResidualAdds` and, where int8 GEMMs need
    unsigned sources (`signed_int8` False; default: every CPU without AMX), the unsigned-source pass;
    optionally the autotuned GEMM templates, plus `extra` overrides."""
    if signed_int8 is None:
        signed_int8 = int8_signed_native()
    return {
        "freezing": True,
        "joint_custom_pre_pass": SizesFromInputs(),
        "post_grad_custom_pre_pass": PostGradPasses(unsigned_sources=not signed_int8),
        **(AUTOTUNE_CONFIGS if autotune else {}),
        **(extra or {}),
    }


def export_program(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    *,
    dynamic_batch: bool = True,
    dynamic_seq: bool = True,
    bf16: bool = True,
    batch_axes: tuple[int, ...] | None = None,
) -> torch.export.ExportedProgram:
    """`torch.export` program of a prepared copy of `model`, batch and sequence axes dynamic if asked.

    `batch_axes` gives each input's batch axis (default 0 for every input; e.g. a recurrent state
    (layers, B, hidden) has it at 1).
    """
    axes = batch_axes or (0,) * len(example_inputs)
    inputs = _examples_for_dynamic(example_inputs, dynamic_batch, dynamic_seq, axes)
    shapes = _dynamic_shapes(inputs, dynamic_batch, dynamic_seq, axes)
    with torch.no_grad():
        program = torch.export.export(prepare(model, bf16), inputs, dynamic_shapes=shapes)
    _drop_metadata_asserts(program.graph_module)
    return program


def compile_package(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    out_path: str | Path,
    *,
    dynamic_batch: bool = True,
    dynamic_seq: bool = True,
    bf16: bool = True,
    autotune: bool = False,
    extra_configs: dict[str, Any] | None = None,
    batch_axes: tuple[int, ...] | None = None,
    signed_int8: bool | None = None,
) -> Path:
    """Export, lower and package `model` into an AOTInductor `.pt2` at `out_path` (written atomically).

    The package takes the example inputs' tensors positionally (e.g. input_ids, attention_mask)
    and returns the model's outputs as float32, token states first. `bf16` runs the float
    (non-quantized) ops in bf16; quantized layers run int8 GEMMs with bf16 (else fp32) outputs.
    Batch (from 1) and sequence axes are dynamic unless switched off. `autotune` lets Inductor
    pick its C++ GEMM templates where they beat oneDNN (slower compile); `extra_configs`
    overrides any Inductor setting. `signed_int8`: keep signed int8 GEMM sources (default: on AMX only).
    """
    out = Path(out_path)
    configs = inductor_configs(extra_configs, autotune, signed_int8)
    with atomic_path(out) as tmp, torch.no_grad():
        try:
            _package(model, example_inputs, tmp, dynamic_batch, dynamic_seq, bf16, configs, batch_axes)
        except torch._inductor.exc.InductorError as e:
            if not bf16:
                raise
            # Inductor cannot lower some bf16 patterns (seen: a small Linear behind BatchNorm); fp32 float ops then.
            warnings.warn(
                f"bf16 lowering failed ({str(e).splitlines()[0][:200]}); float ops stay fp32", ExportWarning, 2
            )
            _package(model, example_inputs, tmp, dynamic_batch, dynamic_seq, False, configs, batch_axes)
    return out


def _package(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    dynamic_batch: bool,
    dynamic_seq: bool,
    bf16: bool,
    configs: dict[str, Any],
    batch_axes: tuple[int, ...] | None,
) -> None:
    program = export_program(
        model, example_inputs, dynamic_batch=dynamic_batch, dynamic_seq=dynamic_seq, bf16=bf16, batch_axes=batch_axes
    )
    # Packaged in memory, then written: torch's zip writer aborts the process when a write fails
    # (a full disk), where a failed Python write is an error the caller reports.
    buffer = io.BytesIO()
    torch._inductor.aoti_compile_and_package(program, package_path=buffer, inductor_configs=configs)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def compile_model(
    model: nn.Module,
    *,
    bf16: bool = True,
    dynamic: bool = True,
    autotune: bool = False,
    extra_configs: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """The same lowering in-process: a torch.compile'd prepared copy of `model` (inference only)."""
    options = inductor_configs(extra_configs, autotune)
    compiled = torch.compile(prepare(model, bf16), dynamic=dynamic, options=options)

    def run(*inputs: torch.Tensor) -> Any:
        # Dynamo reads `freezing` while tracing (to make weights graph constants), not just Inductor.
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            return compiled(*inputs)

    return run


def package_kernels(path: str | Path) -> dict[str, int]:
    """How often the package's generated wrapper calls each ATen / oneDNN kernel (e.g.
    `qlinear_pointwise_tensor`: int8 GEMM, `_linear_pointwise`: float oneDNN GEMM), plus the
    fused post-ops of the int8 GEMMs (`post_op:gelu`)."""
    counts: dict[str, int] = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if not name.endswith("wrapper.cpp"):
                continue
            code = z.read(name).decode("utf-8", "replace")
            calls = re.findall(r"AOTI_TORCH_ERROR_CODE_CHECK\(aoti_torch_cpu_+(\w+?)\(", code)
            calls += [f"post_op:{op}" for op in re.findall(r'qlinear_pointwise\w*\(.*?"(gelu|relu)"', code)]
            for op in calls:
                counts[op] = counts.get(op, 0) + 1
    return counts


def _inputs_to_bf16(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(x.to(torch.bfloat16) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)


def _outputs_to_float32(module: nn.Module, inputs: Any, out: Any) -> Any:
    # A bf16 package returns float32 like the fp32 model (a cheap cast of the outputs).
    def cast(x: Any) -> Any:
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return type(out)(cast(o) for o in out) if isinstance(out, (tuple, list)) else cast(out)


def _drop_metadata_asserts(gm: torch.fx.GraphModule) -> None:
    # Export checks each `.to()` with an `_assert_tensor_metadata` node; as a second user of a
    # dequantize node it stops Inductor from fusing the q/dq pattern into an int8 GEMM.
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
    gm.recompile()


class SizesFromInputs(CustomGraphPass):
    """Read every dynamic size off a graph input instead of an activation (an Inductor joint-graph pass).

    Tracing with dynamic shapes leaves `sym_size(activation)` nodes (e.g. from
    `hidden_states.shape[:-1]`); as extra users of a GEMM's output they stop Inductor from fusing
    GELU, residual adds and the next layer's quantization into the int8 GEMM.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        _sizes_from_inputs(graph)

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))


class PostGradPasses(CustomGraphPass):
    """The post-grad passes of the int8 lowering, in order.

    `_split_residual_adds`: undo Inductor's fusion of a residual add into an int8 GEMM with float
    output. oneDNN runs `qlinear_pointwise.binary` (add post-op on a bf16 tensor) ~1.8x slower than
    the plain GEMM on an AMX CPU (MiniLM, 4096x384x384: 1.98 vs 1.12 ms), while the add costs
    nothing in the LayerNorm kernel that reads the GEMM output next anyway.

    `_unsigned_token_codes` (with `unsigned_sources`): Inductor lowers a per-token layer
    (`_int_mm` on signed int8 codes) to `qlinear_pointwise` with a signed source and a weight
    packed for unsigned ones. AMX multiplies signed sources natively; VNNI and AVX2 do not, and
    oneDNN then runs its reference kernel: ~1 s for one MiniLM FFN GEMM at batch 1, a .pt2 100x
    slower than the fp32 model. The pass feeds the GEMM the same codes shifted into the unsigned
    range with source zero point 128: the integer products are unchanged, and the VNNI kernel runs.
    """

    def __init__(self, unsigned_sources: bool = False) -> None:
        self.unsigned_sources = unsigned_sources

    def __call__(self, graph: torch.fx.Graph) -> None:
        _split_residual_adds(graph)
        if self.unsigned_sources:
            _unsigned_token_codes(graph)

    def uuid(self) -> Any:
        return (get_hash_for_files((__file__,)), self.unsigned_sources)


def _unsigned_token_codes(graph: torch.fx.Graph) -> int:
    """Shift signed int8 GEMM sources (source zero point 0) into uint8 with zero point 128; returns the count."""
    qlinear = torch.ops.onednn.qlinear_pointwise
    count = 0
    for node in list(graph.nodes):
        if node.target not in (qlinear, qlinear.default):
            continue
        qx, x_zp = node.args[0], node.args[2]
        val = qx.meta.get("val") if isinstance(qx, torch.fx.Node) else None
        if val is None or val.dtype != torch.int8 or x_zp != 0:
            continue
        with graph.inserting_before(node):
            wide = graph.call_function(torch.ops.prims.convert_element_type.default, (qx, torch.int32))
            shifted = graph.call_function(torch.ops.aten.add.Tensor, (wide, 128))
            codes = graph.call_function(torch.ops.prims.convert_element_type.default, (shifted, torch.uint8))
        wide.meta["val"] = val.to(torch.int32)
        shifted.meta["val"] = wide.meta["val"] + 128
        codes.meta["val"] = val.to(torch.uint8)
        for new in (wide, shifted, codes):
            new.meta.setdefault("tensor_meta", None)
        node.args = (codes, node.args[1], 128, *node.args[3:])
        count += 1
    return count


def _split_residual_adds(graph: torch.fx.Graph) -> None:
    qlinear = torch.ops.onednn.qlinear_pointwise
    for node in list(graph.nodes):
        if node.target not in (qlinear.binary, qlinear.binary_tensor):
            continue
        (qx, x_scale, x_zp, qw, w_scale, w_zp, other, bias, o_scale, o_zp, o_dtype, other_scale, other_zp, op, alpha,
         unary, unary_args, unary_algorithm) = node.args  # fmt: skip
        float_out = o_dtype in (torch.float32, torch.bfloat16) and o_scale == 1.0 and o_zp == 0
        plain_add = op in ("sum", "add") and alpha == 1.0 and other_scale == 1.0 and other_zp == 0
        if not (float_out and plain_add and unary == "none"):
            continue
        unary_op = qlinear.tensor if node.target is qlinear.binary_tensor else qlinear.default
        with graph.inserting_before(node):
            gemm = graph.call_function(
                unary_op, (qx, x_scale, x_zp, qw, w_scale, w_zp, bias, 1.0, 0, o_dtype, "none", [], "")
            )
            add = graph.call_function(torch.ops.aten.add.Tensor, (gemm, other))
        gemm.meta.update(node.meta)
        add.meta.update(node.meta)
        node.replace_all_uses_with(add)
        graph.erase_node(node)


def _sizes_from_inputs(graph: torch.fx.Graph) -> None:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    owners: dict[Any, tuple[torch.fx.Node, int]] = {}  # symbol -> (placeholder, axis)
    for ph in placeholders:
        val = ph.meta.get("val")
        if isinstance(val, torch.Tensor):
            for axis, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt):
                    owners.setdefault(size.node.expr, (ph, axis))
    cached: dict[tuple[torch.fx.Node, int], torch.fx.Node] = {}
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.sym_size.int or node.args[0].op == "placeholder":
            continue
        size = node.args[0].meta["val"].shape[node.args[1]]
        owner = owners.get(size.node.expr) if isinstance(size, torch.SymInt) else None
        if owner is None:
            continue
        if owner not in cached:
            with graph.inserting_after(placeholders[-1]):
                cached[owner] = graph.call_function(torch.ops.aten.sym_size.int, owner)
                cached[owner].meta["val"] = owner[0].meta["val"].shape[owner[1]]
        node.replace_all_uses_with(cached[owner])
        graph.erase_node(node)
    graph.eliminate_dead_code()


def _examples_for_dynamic(
    inputs: tuple[torch.Tensor, ...], dynamic_batch: bool, dynamic_seq: bool, batch_axes: tuple[int, ...]
) -> tuple[torch.Tensor, ...]:
    # Export specializes axes of size 0 or 1: widen such example axes to 2 so they stay dynamic.
    out = []
    for x, axis in zip(inputs, batch_axes, strict=True):
        if dynamic_batch and x.dim() > axis and x.shape[axis] < 2:
            x = torch.cat([x, x], dim=axis)
        if dynamic_seq and _is_sequence(x) and x.shape[1] < 2:
            x = torch.cat([x, x], dim=1)
        out.append(x)
    return tuple(out)


def _is_sequence(x: torch.Tensor) -> bool:
    # Token ids and masks (B, T) of integers have a sequence axis; image / feature tensors' axis 1 is channels.
    return x.dim() == 2 and not x.is_floating_point()


def _dynamic_shapes(
    inputs: tuple[torch.Tensor, ...], dynamic_batch: bool, dynamic_seq: bool, batch_axes: tuple[int, ...]
) -> tuple[dict[int, Any], ...]:
    # A named batch Dim keeps batch 1 valid (AUTO axes start at 2); AUTO lets export infer the
    # sequence range from the model (e.g. [2, 512] from BERT's position embeddings).
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim.AUTO
    shapes = []
    for x, axis in zip(inputs, batch_axes, strict=True):
        axes: dict[int, Any] = {}
        if dynamic_batch and x.dim() > axis:
            axes[axis] = batch
        if dynamic_seq and _is_sequence(x):
            axes[1] = seq
        shapes.append(axes)
    return tuple(shapes)
