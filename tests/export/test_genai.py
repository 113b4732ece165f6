"""ONNX Runtime GenAI export: a decoder graph with a KV cache (GroupQueryAttention, MatMulNBits) that ONNX
Runtime runs as a generator does and that matches the compressed torch model; the folder genai reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from modelpress.core import numerics
from modelpress.core.context import Context
from modelpress.core.errors import BadInputError
from modelpress.core.options import RunOptions
from modelpress.export import genai, genai_graph
from modelpress.export.genai import export_genai
from modelpress.export.onnx_nbits import nbits_tensors
from modelpress.primitives.affine import QuantScheme
from modelpress.quant import GPTQConfig, QLinear, WeightOnlyConfig, quantize
from modelpress.quant.modules import ActSpec, QEmbedding, holds_table_codes

pytestmark = pytest.mark.usefixtures("one_thread")
HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 16, 2


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer of 300 tokens, trained here on a little of Python's documentation."""
    import pydoc_data.topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(pydoc_data.topics.topics.values())[:40], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _lm(kind: str = "llama", tied: bool = False, seed: int = 0, **overrides) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=300,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        initializer_range=0.2,
    )  # fmt: skip  (large weights: attention far from uniform, so rope errors show)
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **(kw | overrides))).eval()
    with torch.no_grad():  # random norms and biases, so that a missed one shows in the logits
        for name, p in lm.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.5 * torch.randn_like(p))
    return lm


def _prompt(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 300, (batch, length), generator=torch.Generator().manual_seed(seed))


def _calibration() -> list[tuple[torch.Tensor]]:
    return [(_prompt(4, 32, seed),) for seed in range(4)]


def _ort_greedy(folder: Path, ids: torch.Tensor, steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Greedy tokens from the written decoder run with plain ONNX Runtime and a KV cache, and each step's logits."""
    config = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(str(folder / config["filename"]), providers=["CPUExecutionProvider"])
    batch = ids.shape[0]
    empty = np.zeros((batch, config["num_key_value_heads"], 0, config["head_size"]), np.float32)
    layers = config["num_hidden_layers"]
    feed = {config["inputs"][f"past_{kv}_names"] % i: empty for i in range(layers) for kv in ("key", "value")}
    names = [o.name for o in session.get_outputs()]
    seq, step, logits = ids.numpy(), ids.numpy(), []
    for _ in range(steps):
        run = session.run(None, feed | {"input_ids": step, "attention_mask": np.ones_like(seq)})
        out = dict(zip(names, run, strict=True))
        logits.append(out["logits"])
        for i in range(layers):
            for kv in ("key", "value"):
                feed[config["inputs"][f"past_{kv}_names"] % i] = out[config["outputs"][f"present_{kv}_names"] % i]
        step = out["logits"][:, -1:].argmax(-1)
        seq = np.concatenate([seq, step], axis=1)
    return seq[:, ids.shape[1] :], logits


def _hf_greedy(lm: nn.Module, ids: torch.Tensor, steps: int) -> np.ndarray:
    """torch's greedy tokens, each from a full forward over the sequence so far (no cache, no stop token)."""
    seq = ids
    with torch.no_grad(), numerics.exact():
        for _ in range(steps):
            nxt = lm(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq[:, ids.shape[1] :].numpy()


def _ops(folder: Path) -> dict[str, int]:
    graph = onnx.load(str(folder / "model.onnx")).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _check_generates_like_torch(
    lm: nn.Module,
    folder: Path,
    steps: int = 8,
    prompt: torch.Tensor | None = None,
    exact: bool = True,
    margin: float = 0.1,
) -> None:
    """Greedy generation through the KV cache gives torch's tokens; every step's logits are torch's.

    With int8 activations (accuracy_level 4) a near tie may go the other way: then each token the graph
    picks must be within `margin` of torch's best at that step (these models' logits spread about 1.8)."""
    ids = _prompt() if prompt is None else prompt
    ours, logits = _ort_greedy(folder, ids, steps)
    full = torch.from_numpy(np.concatenate([ids.numpy(), ours[:, :-1]], axis=1))
    with torch.no_grad(), numerics.exact():
        want = lm(input_ids=full, attention_mask=torch.ones_like(full)).logits.float().numpy()
    got = np.concatenate(logits, axis=1)
    assert got.shape == want.shape
    cos = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cos.mean() > 0.999, cos.mean()
    if exact:
        np.testing.assert_array_equal(ours, _hf_greedy(lm, ids, steps))
    else:
        step_logits = want[:, ids.shape[1] - 1 :]  # torch's logits where each new token was chosen
        picked = np.take_along_axis(step_logits, ours[..., None], axis=-1)[..., 0]
        assert (picked >= step_logits.max(-1) - margin).all()


@pytest.mark.parametrize("tied", [True, False])
def test_float_decoder_generates_like_torch_and_writes_what_genai_reads(tmp_path, tokenizer, tied):
    lm = _lm(tied=tied)
    report = export_genai(lm, tmp_path / "g", tokenizer=tokenizer, accuracy_level=0, lm_head_bits=None)
    folder = tmp_path / "g"
    assert report["parity"]["mean_cosine"] > 0.99999 and report["parity"]["greedy_agreement"] == 1.0
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    ops = _ops(folder)
    assert ops["GroupQueryAttention"] == LAYERS and ops["SkipSimplifiedLayerNormalization"] == 2 * LAYERS
    assert ops["SimplifiedLayerNormalization"] == 1 and "MatMulNBits" not in ops
    assert ops["MatMul"] == 5 * LAYERS + 1  # per layer: q/k/v packed in one, o, gate, up, down; then lm_head
    config = json.loads((folder / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (
        LAYERS, HEADS, KV_HEADS)  # fmt: skip
    assert decoder["head_size"] == HEAD_DIM and config["model"]["type"] == "llama"
    assert config["model"]["vocab_size"] == 300 and config["search"]["max_length"] == 128
    if tied:  # one (H, V) table serves the embedding lookup and the lm_head
        graph = onnx.load(str(folder / "model.onnx")).graph
        assert [t.name for t in graph.initializer if 300 in t.dims] == ["lm_head.weight_t"]
    _check_generates_like_torch(lm, folder)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_4bit_layers_become_matmul_nbits_with_their_own_codes(tmp_path, tokenizer, method):
    float_lm = _lm()
    if method == "rtn":
        lm = quantize(float_lm, WeightOnlyConfig(bits=4, symmetric=False, granularity="group", group_size=32))
    else:
        ctx = Context(options=RunOptions(progress=False))
        lm = quantize(float_lm, GPTQConfig(bits=4, group_size=32), data=_calibration(), ctx=ctx)
    report = export_genai(lm, tmp_path / "g", tokenizer=tokenizer)
    quantized = {n for n, m in lm.named_modules() if isinstance(m, QLinear)}
    assert set(report["matmul_nbits"]) == quantized | {"lm_head"} and len(quantized) >= 7 * LAYERS
    assert report["accuracy_level"] == 4 and report["parity"]["mean_cosine"] > 0.999
    graph = onnx.load(str(tmp_path / "g" / "model.onnx")).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 5 * LAYERS + 1  # q/k/v share one MatMulNBits; lm_head its own or the export's int8
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    down = lm.model.layers[1].mlp.down_proj
    b, scales, zp = nbits_tensors(down)  # our codes, as they are: no re-quantization
    stem = "model.layers.1.mlp.down_proj"
    np.testing.assert_array_equal(inits[f"{stem}.B"], b)
    np.testing.assert_array_equal(inits[f"{stem}.scales"].ravel(), scales)
    np.testing.assert_array_equal(inits[f"{stem}.zero_points"], zp)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert (attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"]) == (4, 32, 64, (HEADS + 2 * KV_HEADS) * 16)
    _check_generates_like_torch(lm, tmp_path / "g", exact=False)


@pytest.mark.parametrize("tied", [True, False])
def test_a_float_lm_head_is_quantized_by_the_export_and_a_tied_lookup_reads_its_codes(tmp_path, tokenizer, tied):
    lm = _lm(tied=tied)
    report = export_genai(lm, tmp_path / "g", tokenizer=tokenizer)
    assert report["matmul_nbits"]["lm_head"].startswith("int8 sym group 32, quantized by the export")
    assert report["parity"]["mean_cosine"] > 0.999
    graph = onnx.load(str(tmp_path / "g" / "model.onnx")).graph
    tables = sorted(t.name for t in graph.initializer if 300 in t.dims)
    head_tables = ["lm_head.B", "lm_head.scales"]
    assert tables == (head_tables if tied else ["embed_tokens.weight", *head_tables])
    gather = next(n for n in graph.node if n.name.startswith("embed/Gather"))
    assert gather.op_type == ("GatherBlockQuantized" if tied else "Gather")
    head = next(n for n in graph.node if n.name == "lm_head/MatMulNBits")
    assert list(head.input[1:3]) == ["lm_head.B", "lm_head.scales"] and head.output[0] == "logits"
    _check_generates_like_torch(lm, tmp_path / "g", exact=False)
    report = export_genai(lm, tmp_path / "f", tokenizer=tokenizer, lm_head_bits=None)
    assert "lm_head" in report["float"] and "lm_head" not in report["matmul_nbits"]


@pytest.mark.parametrize("table", [{"embedding_bits": 8}, {"head_bits": 4}])
def test_a_tied_head_quantized_with_its_table_is_one_table(tmp_path, tokenizer, table):
    """An int8 table whose codes the head holds, or (`head_bits`) a 4-bit head calibrated by GPTQ whose codes
    the table takes: either way one table in the file, read by the head's MatMulNBits and the lookup."""
    float_lm = _lm(tied=True, vocab_size=1024)  # 65,536 values: a table the pass quantizes
    cfg = GPTQConfig(bits=4, group_size=32, embedding_group_size=32, **table)
    lm = quantize(float_lm, cfg, data=_calibration(), ctx=Context(options=RunOptions(progress=False)))
    report = export_genai(lm, tmp_path / "g", tokenizer=tokenizer)
    assert report["matmul_nbits"]["lm_head"].endswith("its codes also serve the embedding lookup (one table)")
    graph = onnx.load(str(tmp_path / "g" / "model.onnx")).graph
    assert sorted(t.name for t in graph.initializer if 1024 in t.dims) == ["lm_head.B", "lm_head.scales"]
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    np.testing.assert_array_equal(inits["lm_head.B"], nbits_tensors(lm.lm_head)[0])  # the pass's own codes
    assert next(n for n in graph.node if n.name.startswith("embed/Gather")).op_type == "GatherBlockQuantized"
    # int8 activations into a 4-bit head move the logits more than into an 8-bit one (measured: 0.10)
    _check_generates_like_torch(lm, tmp_path / "g", exact=False, margin=0.1 if "embedding_bits" in table else 0.2)


@pytest.mark.parametrize("level", [4, 0])
def test_wide_groups_are_written_in_blocks_of_32_for_int8_activations(tmp_path, tokenizer, level):
    """Group 64 over a 160-wide input (a short last group): at accuracy_level 4 the same codes go in blocks
    of 32, each group's scale and zero point repeated; MatMulNBits' weight is still ours, exactly."""
    from modelpress.primitives.packing import unpack_bits

    lm = quantize(_lm(intermediate_size=160), WeightOnlyConfig(bits=4, symmetric=False, granularity="group",
                                                               group_size=64))  # fmt: skip
    report = export_genai(lm, tmp_path / "g", tokenizer=tokenizer, accuracy_level=level)
    block = 32 if level == 4 else 64
    suffix = " (in blocks of 32)" if level == 4 else ""
    assert report["matmul_nbits"]["model.layers.0.mlp.down_proj"] == f"int4 asym group 64{suffix}"
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "g" / "model.onnx")).graph.initializer}
    stem = "model.layers.0.mlp.down_proj"
    b, scales, zp = (torch.from_numpy(inits[f"{stem}.{k}"]) for k in ("B", "scales", "zero_points"))
    n, count = 64, -(-160 // block)
    assert tuple(b.shape) == (n, count, block // 2) and tuple(scales.shape) == (n, count)
    codes = unpack_bits(b, 4, n * count * block).reshape(n, count * block).float()
    zeros = torch.stack([unpack_bits(row, 4, count) for row in zp.reshape(n, -1)]).float()
    weight = (codes - zeros.repeat_interleave(block, 1)) * scales.repeat_interleave(block, 1)
    assert torch.equal(weight[:, :160], lm.model.layers[0].mlp.down_proj.dequantized_weight())
    assert not weight[:, 160:].any()  # the padding of the short last block dequantizes to 0
    _check_generates_like_torch(lm, tmp_path / "g", exact=level == 0)


def test_mixed_schemes_8bit_per_channel_and_quantized_embeddings(tmp_path, tokenizer):
    """q at 8 bits beside 4-bit k/v: three MatMulNBits feed the attention; a per-channel layer is a MatMulNBits
    too (its row's scale in every block); an int8 embedding table is gathered from its codes."""
    float_lm = _lm(tied=True)
    lm = quantize(float_lm, WeightOnlyConfig(bits=4, granularity="group", group_size=16))
    lm.model.embed_tokens = QEmbedding(float_lm.model.embed_tokens, bits=8)  # per row; lm_head stays float
    src = float_lm.model.layers[0]
    attn, mlp = lm.model.layers[0].self_attn, lm.model.layers[0].mlp
    attn.q_proj = QLinear.from_float(src.self_attn.q_proj, QuantScheme(8, True, "group", 0, 32))
    mlp.up_proj = QLinear.from_float(src.mlp.up_proj, QuantScheme(8, True, "channel", 0))
    report = export_genai(lm, tmp_path / "g", tokenizer=tokenizer)
    assert report["matmul_nbits"]["model.layers.0.self_attn.q_proj"] == "int8 sym group 32"
    assert report["matmul_nbits"]["model.layers.0.self_attn.k_proj"] == "int4 sym group 16"
    assert report["matmul_nbits"]["model.layers.0.mlp.up_proj"] == "int8 sym per channel (in blocks of 32)"
    assert not report["float"] or set(report["float"]) == {"lm_head"}
    gqa = [n for n in onnx.load(str(tmp_path / "g" / "model.onnx")).graph.node if n.op_type == "GroupQueryAttention"]
    assert all(gqa[0].input[:3]) and not any(gqa[1].input[1:3])  # separate q, k, v in layer 0; packed in layer 1
    assert report["parity"]["mean_cosine"] > 0.999
    _check_generates_like_torch(lm, tmp_path / "g", exact=False)


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_weights_are_matmul_nbits_blocks_carrying_the_rows_scale(tmp_path, tokenizer, symmetric):
    """The `w8` recipe's per-channel int8 (and asymmetric per-channel codes): every projection a MatMulNBits of
    the same codes in blocks of 32 (int8 activations) or 128 (float), a width the block does not divide padded;
    the decoder computes what the quantized model computes."""
    lm = quantize(_lm(intermediate_size=80), WeightOnlyConfig(bits=8, granularity="channel", symmetric=symmetric))
    for level, block in ((4, 32), (0, 128)):
        folder = tmp_path / f"level{level}"
        report = export_genai(lm, folder, tokenizer=tokenizer, accuracy_level=level)
        kind = "sym" if symmetric else "asym"
        written = report["matmul_nbits"]["model.layers.0.mlp.down_proj"]
        assert written == f"int8 {kind} per channel (in blocks of {block})"
        assert set(report["float"]) <= {"lm_head"}
        nodes = [n for n in onnx.load(str(folder / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
        assert {a.i for n in nodes for a in n.attribute if a.name == "block_size"} == {block}
        assert report["parity"]["mean_cosine"] > (0.9999 if level == 0 else 0.999)  # level 4: int8 activations
        _check_generates_like_torch(lm, folder, exact=level == 0)


def test_qwen2_biases_and_mistral_sliding_window(tmp_path, tokenizer):
    qwen = quantize(_lm("qwen2", tied=True), WeightOnlyConfig(bits=4, granularity="group", group_size=32))
    assert qwen.model.layers[0].self_attn.q_proj.bias is not None
    report = export_genai(qwen, tmp_path / "q", tokenizer=tokenizer)
    assert json.loads((tmp_path / "q" / "genai_config.json").read_text())["model"]["type"] == "qwen2"
    assert report["parity"]["mean_cosine"] > 0.999
    graph = onnx.load(str(tmp_path / "q" / "model.onnx")).graph
    qkv = next(n for n in graph.node if n.name == "model.layers.0.attn.qkv_proj/MatMulNBits")
    assert qkv.input[5] == "model.layers.0.attn.qkv_proj.bias"  # the biases go into the op
    _check_generates_like_torch(qwen, tmp_path / "q", exact=False)

    mistral = _lm("mistral", sliding_window=6)  # a window shorter than the prompt: the cache must honour it
    export_genai(mistral, tmp_path / "m", tokenizer=tokenizer, accuracy_level=0)
    graph = onnx.load(str(tmp_path / "m" / "model.onnx")).graph
    gqa = next(n for n in graph.node if n.op_type == "GroupQueryAttention")
    assert next(a.i for a in gqa.attribute if a.name == "local_window_size") == 6
    _check_generates_like_torch(mistral, tmp_path / "m", prompt=_prompt(1, 10))


def test_a_causal_lm_wrapper_brings_its_tokenizer(tmp_path, tokenizer):
    from modelpress.zoo.causal_lm import CausalLM

    model = CausalLM(_lm(tied=True), tokenizer)
    report = export_genai(model, tmp_path / "g", prompt_ids=_prompt(1, 20))
    assert report["parity"]["positions"] == 20 + genai.DECODE_STEPS
    from transformers import AutoTokenizer

    back = AutoTokenizer.from_pretrained(tmp_path / "g")
    assert back("def f(x):").input_ids == tokenizer("def f(x):").input_ids


def test_large_weights_go_to_external_data_and_special_tokens_fall_back(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(genai, "EXTERNAL_DATA_BYTES", 0)
    lm = _lm(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    lm.generation_config.bos_token_id = lm.generation_config.eos_token_id = None
    lm.generation_config.pad_token_id = None
    export_genai(lm, tmp_path / "g", tokenizer=tokenizer)
    assert (tmp_path / "g" / "model.onnx.data").stat().st_size > (tmp_path / "g" / "model.onnx").stat().st_size
    model = json.loads((tmp_path / "g" / "genai_config.json").read_text())["model"]
    eos = tokenizer.eos_token_id  # neither config names one: the tokenizer's
    assert (model["eos_token_id"], model["bos_token_id"], model["pad_token_id"]) == (eos, eos, eos)
    _check_generates_like_torch(lm, tmp_path / "g", exact=False)


def test_refusals_name_what_is_wrong_and_write_nothing(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300))
    with pytest.raises(BadInputError, match="not a transformers causal LM|not 'gpt2'"):
        export_genai(gpt2, tmp_path / "g", tokenizer=tokenizer)
    with pytest.raises(BadInputError, match="SiLU.*'gelu'"):
        export_genai(_lm(hidden_act="gelu"), tmp_path / "g", tokenizer=tokenizer)
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(BadInputError, match="rope type 'dynamic'.*supported: default, linear, llama3, yarn"):
        export_genai(_lm(rope_parameters=dynamic), tmp_path / "g", tokenizer=tokenizer)
    with pytest.raises(BadInputError, match="Hugging Face tokenizer.*got none"):
        export_genai(_lm(), tmp_path / "g")  # e.g. tiny-lm's byte tokenizer: no tokenizer.json to give genai
    with pytest.raises(BadInputError, match="accuracy_level"):
        export_genai(_lm(), tmp_path / "g", tokenizer=tokenizer, accuracy_level=7)
    with pytest.raises(BadInputError, match="lm_head_bits must be 4, 8 or None"):
        export_genai(_lm(), tmp_path / "g", tokenizer=tokenizer, lm_head_bits=3)
    shared = _lm(tied=True)
    shared.model.embed_tokens = QEmbedding(shared.model.embed_tokens, bits=8)  # per row
    shared.lm_head = QLinear.from_float(shared.lm_head, QuantScheme(8, True, "channel", 0))  # the same codes
    assert holds_table_codes(shared.lm_head, shared.model.embed_tokens)
    shared.lm_head.act = ActSpec(mode="dynamic", granularity="token")  # ... with int8 activations
    with pytest.raises(BadInputError, match="lm_head shares its codes with the embedding table, but dynamic"):
        export_genai(shared, tmp_path / "g", tokenizer=tokenizer)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_rope_scaling_that_depends_on_position_only_is_written(tmp_path, tokenizer):
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32, "rope_theta": 10000.0}  # fmt: skip
    lm = _lm(rope_parameters=llama3)
    report = export_genai(lm, tmp_path / "g", tokenizer=tokenizer, accuracy_level=0, lm_head_bits=None)
    assert report["parity"]["mean_cosine"] > 0.99999


def test_int8_activations_that_drift_fall_back_to_float_compute(tmp_path, tokenizer):
    lm = quantize(_lm(), WeightOnlyConfig(bits=4, granularity="group", group_size=32))
    with torch.no_grad():  # one huge channel into every projection: int8 blocks of activations lose the others
        for layer in lm.model.layers:
            layer.input_layernorm.weight[0] = layer.post_attention_layernorm.weight[0] = 2000.0
    report = export_genai(lm, tmp_path / "g", tokenizer=tokenizer)
    assert report["accuracy_level"] == 0 and report["parity"]["mean_cosine"] > 0.999
    assert any("int8 activations drift (accuracy_level 4: mean cosine" in n for n in report["notes"])
    graph = onnx.load(str(tmp_path / "g" / "model.onnx")).graph
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {0}
    with pytest.raises(BadInputError, match="accuracy_level 4: mean cosine"):
        export_genai(lm, tmp_path / "h", tokenizer=tokenizer, accuracy_level=4)
    assert not (tmp_path / "h").exists()


def test_a_graph_that_drifts_is_refused_and_not_written(tmp_path, tokenizer, monkeypatch):
    def wrong_caches(rotary, positions):  # rotations the wrong way round
        cos, sin = genai_rope(rotary, positions)
        return cos, -sin

    genai_rope = genai_graph.rope_caches
    monkeypatch.setattr(genai_graph, "rope_caches", wrong_caches)
    with pytest.raises(BadInputError, match="does not compute what the compressed model computes"):
        export_genai(_lm(), tmp_path / "g", tokenizer=tokenizer)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai not installed")
def test_onnxruntime_genai_generates_torchs_tokens(tmp_path, tokenizer):
    import onnxruntime_genai as og

    lm = quantize(_lm(tied=True), WeightOnlyConfig(bits=4, granularity="group", group_size=32))
    export_genai(lm, tmp_path / "g", tokenizer=tokenizer)
    model = og.Model(str(tmp_path / "g"))
    ids = _prompt(1, 10)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + 12, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids[0].tolist())
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == _hf_greedy(lm, ids, 12)[0].tolist()
    assert og.Tokenizer(model).encode("def f(x):").tolist() == tokenizer("def f(x):").input_ids


def test_in_a_compress_run_other_models_get_a_warning_not_a_crash(tmp_path, tokenizer):
    from modelpress.zoo.causal_lm import CausalLM

    ctx = Context(options=RunOptions(progress=False))
    example = (_prompt(2, 16), torch.ones(2, 16, dtype=torch.long))
    genai.export_to_report(nn.Linear(4, 4), example, tmp_path / "genai", ctx)
    assert "genai/ not written: ONNX Runtime GenAI folders are written for transformers causal language models only " \
        "(a causal-LM folder, a .gguf file, smollm2-135m), not Linear" in ctx.report.warnings  # fmt: skip
    qwen = CausalLM(_lm("qwen2", use_sliding_window=True, sliding_window=8), tokenizer)
    genai.export_to_report(qwen, example, tmp_path / "genai", ctx)
    assert any("use_sliding_window=True" in w for w in ctx.report.warnings)
    assert not (tmp_path / "genai").exists()
    genai.export_to_report(CausalLM(_lm(), tokenizer), example, tmp_path / "genai", ctx)
    stats = next(p for p in ctx.report.passes if p.name == "export/genai" and "refused" not in p.stats).stats
    assert stats["parity_positions"] == 16 + genai.DECODE_STEPS and stats["parity_mean_cosine"] > 0.999
    assert (tmp_path / "genai" / "genai_config.json").is_file()
    assert stats["generation"]["bs1"]["decode_tokens_per_s"] > 0 and stats["generation"]["prompt_tokens"] == 16
    assert "| genai/ (ONNX Runtime) |" in ctx.report.to_markdown()  # beside the eager model's generation speed


def test_decode_speed_times_a_prefill_then_one_cached_call_per_new_token(tmp_path, tokenizer, monkeypatch):
    lm = _lm()
    export_genai(lm, tmp_path / "g", tokenizer=tokenizer, accuracy_level=0, lm_head_bits=None)
    shapes: list[tuple[tuple[int, ...], int]] = []
    make = genai._session

    class Counting:
        def __init__(self, path, threads):
            self.inner = make(path, threads)

        def get_outputs(self):
            return self.inner.get_outputs()

        def run(self, names, feed):
            shapes.append((feed["input_ids"].shape, feed["past_key_values.0.key"].shape[2]))
            return self.inner.run(names, feed)

    monkeypatch.setattr(genai, "_session", Counting)
    speed = genai.decode_speed(tmp_path / "g" / "model.onnx", _prompt(2, 16), genai.decoder_spec(lm), new_tokens=5,
                               batches=(1, 3), repeats=2)  # fmt: skip
    assert speed["prompt_tokens"] == 16 and speed["new_tokens"] == 5
    for batch in ("bs1", "bs3"):
        assert speed[batch]["prefill_tokens_per_s"] > 0 and speed[batch]["decode_tokens_per_s"] > 0
    timed = shapes[3:8]  # after the 3 calls of the warm-up: a prefill on an empty cache, then 4 cached steps
    assert [s for s, _ in timed] == [(1, 16)] + [(1, 1)] * 4 and [p for _, p in timed] == [0, 16, 17, 18, 19]
    assert len(shapes) == 2 * (3 + 2 * 5) and shapes[-1] == ((3, 1), 19)
