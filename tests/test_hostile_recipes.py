"""Hostile or careless input: recipe files, pass configs and numeric options fail fast with a message.

Every case is a `ConfigError` / `BadInputError` (exit 2 on the command line) raised before any model
loads, never an internal error, a hang or minutes of work.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import threading
import time
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modelpress.distill
import modelpress.prune
import modelpress.quant  # noqa: F401  (config classes register on import)
from modelpress.cli import main
from modelpress.core import Config, ConfigError
from modelpress.core.config import _CONFIG_TYPES, MAX_EPOCHS
from modelpress.core.environment import check_threads, usable_cpus
from modelpress.core.errors import BadInputError
from modelpress.core.options import RunOptions
from modelpress.recipes.recipe import (
    MAX_RECIPE_BYTES,
    MAX_RECIPE_DEPTH,
    MAX_RECIPE_NODES,
    load_recipe,
    parse_recipe,
)

CONFIGS = {name: cls for name, cls in sorted(_CONFIG_TYPES.items()) if cls.__module__.startswith("modelpress.")}


def _fields(cls: type[Config], kind: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if hint is kind or kind in typing.get_args(hint):
            out.append(f.name)
    return out


FLOAT_FIELDS = [(name, field) for name, cls in CONFIGS.items() for field in _fields(cls, float)]


def _refuses(fn: Any, *args: Any, error: type[Exception] = ConfigError, **kwargs: Any) -> str:
    with pytest.raises(error) as exc:
        fn(*args, **kwargs)
    return str(exc.value)


def _recipe_file(tmp_path: Path, content: str | bytes, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# ---------------------------------------------------------------- recipe files


def test_a_binary_recipe_file_is_not_utf8_text(tmp_path):
    path = _recipe_file(tmp_path, bytes(range(256)) * 4, "model.bin")
    message = _refuses(load_recipe, path)
    assert "model.bin" in message and "not UTF-8 text" in message


@pytest.mark.parametrize(
    "text",
    [
        "passes: " + "[" * 10_000 + "]" * 10_000,
        "passes: " + "{a: " * 10_000 + "1" + "}" * 10_000,
        "passes:\n" + "".join("  " * i + "- \n" for i in range(200)),
    ],
    ids=["flow-lists", "flow-mappings", "block-lists"],
)
def test_deep_nesting_is_refused_at_once(tmp_path, text):
    start = time.perf_counter()
    message = _refuses(load_recipe, _recipe_file(tmp_path, text))
    assert f"nested deeper than {MAX_RECIPE_DEPTH} levels" in message
    assert time.perf_counter() - start < 2


def test_deep_python_data_is_refused_by_parse_recipe():
    deep: Any = 1
    for _ in range(10_000):
        deep = [deep]
    assert "nested deeper than" in _refuses(parse_recipe, {"passes": deep}, "deep")
    mapping: Any = {}
    for _ in range(10_000):
        mapping = {"a": mapping}
    assert "nested deeper than" in _refuses(parse_recipe, {"passes": [{"type": "DistillConfig"}], "x": mapping}, "d")
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    assert "nested deeper than" in _refuses(parse_recipe, {"passes": cyclic}, "cyclic")
    shared: Any = ["lol"] * 10
    for _ in range(8):
        shared = [shared] * 10  # 10**9 values once expanded, a few objects in memory
    assert f"more than {MAX_RECIPE_NODES} values" in _refuses(parse_recipe, {"passes": shared}, "laughs")


def _billion_laughs() -> str:
    text = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
    return text + "passes: [{type: StructuredPruneConfig, ffn_ratio: 0.5, exclude: *i}]\n"


def test_billion_laughs_is_refused_fast(tmp_path):
    start = time.perf_counter()
    message = _refuses(load_recipe, _recipe_file(tmp_path, _billion_laughs()))
    assert time.perf_counter() - start < 2
    assert f"more than {MAX_RECIPE_NODES} values with aliases expanded" in message


def test_merge_keys_that_double_are_refused_and_recursive_aliases_too(tmp_path):
    text = "a0: &a0 {x: 1}\n" + "".join(f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}]}}\n" for i in range(1, 40))
    start = time.perf_counter()
    assert "aliases expanded" in _refuses(load_recipe, _recipe_file(tmp_path, text + "passes: []\n"))
    assert time.perf_counter() - start < 2
    assert "recursive" in _refuses(load_recipe, _recipe_file(tmp_path, "passes: &p [*p]\n"))


def test_a_recipe_with_a_few_anchors_still_loads(tmp_path):
    text = (
        "description: shared layer filter\n"
        "passes:\n"
        "  - {type: StructuredPruneConfig, ffn_ratio: 0.25, exclude: &keep ['classifier', 'pooler']}\n"
        "  - {type: WeightOnlyConfig, bits: 8, layers: {exclude: *keep}}\n"
    )
    recipe = load_recipe(_recipe_file(tmp_path, text))
    assert recipe.passes[0].exclude == ("classifier", "pooler")
    assert recipe.passes[1].layers.exclude == ("classifier", "pooler")


def test_python_tags_stay_refused(tmp_path):
    text = "passes: !!python/object/apply:os.system ['echo pwned']\n"
    assert "invalid YAML" in _refuses(load_recipe, _recipe_file(tmp_path, text))


def test_an_oversized_recipe_file_is_refused_unread(tmp_path):
    path = _recipe_file(tmp_path, "# padding\n" * (MAX_RECIPE_BYTES // 10 + 1))
    assert f"at most {MAX_RECIPE_BYTES} bytes (1 MiB)" in _refuses(load_recipe, path)


@pytest.mark.parametrize(
    "value",
    ["9" * 5000, "!!timestamp ''", "!!bool maybe", "!!int 0x", "!!float ':'", "!!binary é"],
    ids=["5000-digits", "empty-timestamp", "bool", "int", "float", "binary"],
)
def test_scalars_that_do_not_read_as_their_tag_are_invalid_yaml(tmp_path, value):
    text = f"passes: [{{type: DistillConfig, epochs: {value}}}]\n"
    assert "invalid YAML" in _refuses(load_recipe, _recipe_file(tmp_path, text))


def _without_hanging(fn: Any, timeout: float = 5.0) -> BaseException | None:
    """Run `fn` in a daemon thread; fail if it is still blocked after `timeout` seconds."""
    caught: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            caught[0] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"still blocked after {timeout} s"
    return caught[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_recipe_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    error = _without_hanging(lambda: load_recipe(fifo))
    assert isinstance(error, ConfigError) and "is a FIFO (named pipe), not a YAML file" in str(error)


def test_directories_and_devices_are_refused(tmp_path):
    folder = tmp_path / "recipes.yaml"
    folder.mkdir()
    assert "is a directory, not a YAML file" in _refuses(load_recipe, folder)
    if Path("/dev/zero").exists():
        error = _without_hanging(lambda: load_recipe("/dev/zero"))
        assert isinstance(error, ConfigError) and "is a character device" in str(error)
    assert "neither a built-in recipe" in _refuses(load_recipe, "bad\0name.yaml")


# ---------------------------------------------------------------- configs


def test_every_float_field_is_found():
    names = {name for name, _ in FLOAT_FIELDS}
    assert {"UnstructuredPruneConfig", "DistillConfig", "StudentConfig", "SmoothQuantConfig", "GPTQConfig"} <= names
    assert ("UnstructuredPruneConfig", "threshold") in FLOAT_FIELDS  # float | None


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name, field", FLOAT_FIELDS, ids=[f"{n}.{f}" for n, f in FLOAT_FIELDS])
def test_non_finite_floats_are_refused_in_every_config(name, field, value):
    mapping = typing.get_origin(typing.get_type_hints(CONFIGS[name])[field]) is dict  # per-layer values
    wrap = (lambda v: {".*": v}) if mapping else (lambda v: v)
    where = f"{name}.{field}['.*']" if mapping else f"{name}.{field}"
    message = f"{where} must be a finite number, got {value}"
    assert message in _refuses(Config.from_dict, {"type": name, field: wrap(value)})
    assert message in _refuses(CONFIGS[name], **{field: wrap(value)})  # direct construction too
    assert "must be a finite number" in _refuses(Config.from_dict, {"type": name, field: wrap(10**400)})


def test_nan_threshold_and_nan_weight_in_a_recipe(tmp_path):
    text = "passes: [{type: UnstructuredPruneConfig, threshold: .nan}]\n"
    message = _refuses(load_recipe, _recipe_file(tmp_path, text))
    assert "UnstructuredPruneConfig.threshold must be a finite number, got nan" in message
    data = {"passes": [{"type": "DistillConfig", "hidden_weight": float("nan")}]}
    assert "DistillConfig.hidden_weight must be a finite number, got nan" in _refuses(parse_recipe, data, "d")


@pytest.mark.parametrize(
    "name, field",
    [
        ("UnstructuredPruneConfig", "finetune_epochs"),
        ("NMPruneConfig", "finetune_epochs"),
        ("StructuredPruneConfig", "finetune_epochs"),
        ("DistillConfig", "epochs"),
    ],
)
def test_epochs_are_capped(name, field):
    extra = {"ffn_ratio": 0.25} if name == "StructuredPruneConfig" else {}
    assert CONFIGS[name].from_dict({field: MAX_EPOCHS, **extra})  # the cap itself is allowed
    message = _refuses(CONFIGS[name].from_dict, {field: 1_000_000_000, **extra})
    assert f"{name}.{field} must be at most {MAX_EPOCHS}" in message and "1000000000" in message


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"type": "WeightOnlyConfig", "bits": 10**30}, "WeightOnlyConfig.bits must be an integer in [-2**63"),
        ({"type": "WeightOnlyConfig", "bits": 2**40}, "bits must be in [2, 8]"),
        ({"type": "QATConfig", "bits": 99}, "bits must be in [2, 8]"),
        ({"type": "DistillConfig", "seed": 2**40}, "DistillConfig.seed must be in [0, 4294967295]"),
        ({"type": "DistillConfig", "max_seq_length": 10**5000}, "an integer of about 5001 digits"),
        ({"type": "AWQConfig", "n_grid": 10**9}, "AWQConfig.n_grid must be at most 1000"),
        ({"type": "StaticQuantConfig", "dynamic_layers": ["(unclosed"]}, "bad dynamic_layers pattern"),
        ({"type": "WeightOnlyConfig", "layers": {"include": ["(" * 5000 + ")" * 5000]}}, "bad layer pattern"),
        ({"type": "DistillConfig", "features": {"a": 1}}, "DistillConfig.features['a'] must be a string"),
        ({"type": ["DistillConfig"]}, "'type' must name a config class"),
        ({"type": "DistillConfig", 3: 1, "x": 2}, "unknown key 3 for DistillConfig"),
    ],
)
def test_huge_and_odd_values_are_named(data, fragment):
    assert fragment in _refuses(Config.from_dict, data)


# ---------------------------------------------------------------- numeric options


def test_threads_are_checked_in_one_place():
    cpus = usable_cpus()
    assert check_threads(cpus) == cpus and check_threads(None) is None
    for bad in (0, -1, cpus + 1, 1000, True, 1.5):
        message = _refuses(check_threads, bad, error=BadInputError)
        assert f"1..{cpus}" in message and f"got {bad!r}" in message
    assert "positive integer, got 0" in _refuses(RunOptions, threads=0, error=BadInputError)
    assert f"at most {cpus}" in _refuses(RunOptions, threads=cpus + 1, error=BadInputError)


def test_bench_api_refuses_before_loading_anything():
    from modelpress.measure import bench

    start = time.perf_counter()
    assert "threads" in _refuses(bench, ["no-such-model"], threads=usable_cpus() + 1, error=BadInputError)
    assert "repeats" in _refuses(bench, ["no-such-model"], repeats=10**9, error=BadInputError)
    assert "warmup" in _refuses(bench, ["no-such-model"], warmup=-1, error=BadInputError)
    assert "batch_sizes" in _refuses(bench, ["no-such-model"], batch_sizes=(10**9,), error=BadInputError)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, "half", "nan%", "-5%"])
def test_auto_max_drop_must_be_a_finite_non_negative_number(tmp_path, value):
    from modelpress.auto import auto_compress

    message = _refuses(auto_compress, "no-such-model", value, out_dir=tmp_path / "a")
    assert "max_drop must be" in message
    assert not (tmp_path / "a").exists()


CLI_CASES = [
    (["distill", "digits-cnn", "--lr", "inf"], "DistillConfig.lr must be a finite number, got inf"),
    (["distill", "digits-cnn", "--lr", "nan"], "DistillConfig.lr must be a finite number, got nan"),
    (["distill", "digits-cnn", "--temperature", "nan"], "DistillConfig.temperature must be a finite number"),
    (["distill", "digits-cnn", "--alpha", "nan"], "DistillConfig.alpha must be a finite number"),
    (["distill", "digits-cnn", "--hidden-weight", "nan"], "DistillConfig.hidden_weight must be a finite number"),
    (["distill", "digits-cnn", "--width-ratio", "nan"], "StudentConfig.width_ratio must be a finite number"),
    (["distill", "digits-cnn", "--epochs", "1000000000"], f"DistillConfig.epochs must be at most {MAX_EPOCHS}"),
    (["compress", "minilm", "--auto", "--max-drop", "nan"], "max_drop must be a finite number >= 0"),
    (["compress", "minilm", "--auto", "--max-drop", "inf"], "max_drop must be a finite number >= 0"),
    (["compress", "minilm", "--auto", "--max-drop", "-1"], "max_drop must be >= 0"),
    (["compress", "digits-cnn", "--recipe", "int8-static", "--threads", "1000"], "got 1000"),
    (["bench", "digits-cnn", "--threads", "1000"], "got 1000"),
    (["bench", "digits-cnn", "--repeats", "100000000"], "repeats must be an integer in [1, 10000]"),
    (["bench", "digits-cnn", "--warmup", "100000000"], "warmup must be an integer in [0, 10000]"),
    (["bench", "digits-cnn", "--batch-sizes", "1,100000000"], "--batch-sizes must each be at most 65536"),
]


@pytest.mark.parametrize("args, fragment", CLI_CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CLI_CASES])
def test_cli_refuses_bad_numbers_fast(tmp_path, capsys, args, fragment):
    out = tmp_path / "out"
    argv = [*args, "--out", str(out)] if args[0] != "bench" else args
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < 15  # refused before any model loads or trains
    assert fragment in capsys.readouterr().err.replace("\n", "")
    assert not out.exists()


def test_cli_refuses_a_fifo_recipe(tmp_path, capsys):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    argv = ["compress", "digits-cnn", "--recipe", str(fifo), "--out", str(tmp_path / "o")]
    codes: list[int] = []
    assert _without_hanging(lambda: codes.append(main(argv))) is None
    assert codes == [2] and "FIFO" in capsys.readouterr().err


# ---------------------------------------------------------------- fuzzing

_HUGE_INTS = st.sampled_from([2**63, -(2**63) - 1, 10**30, 10**400, 2**64 - 1])
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | _HUGE_INTS
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["onnx", "pt2", "stages", "as-written", "auto", "fp32", "(", "[a-", "*", "a{99999999999}"])
)
_KEYS = st.text(max_size=8) | st.integers(-3, 3) | st.sampled_from(["type", "passes", "export", "order", "lowering"])
_ANY = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=20,
)


def _pass_dicts() -> st.SearchStrategy[dict[str, Any]]:
    """Pass dicts of a real config type, with real field names set to anything."""

    def for_type(name: str) -> st.SearchStrategy[dict[str, Any]]:
        fields = [f.name for f in dataclasses.fields(CONFIGS[name])]
        values = st.dictionaries(st.sampled_from(fields) | _KEYS, _ANY, max_size=4)
        return values.map(lambda d: {**d, "type": name})

    return st.sampled_from(sorted(CONFIGS)).flatmap(for_type)


_PASS = _pass_dicts() | _ANY
_RECIPES = (
    st.fixed_dictionaries(
        {"passes": st.lists(_PASS, max_size=3) | _ANY},
        optional={"export": _ANY, "order": _ANY, "lowering": _ANY, "description": _ANY, "order ": _ANY},
    )
    | _ANY
)
_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(data=_RECIPES)
def test_parse_recipe_succeeds_or_raises_config_error(data):
    try:
        parse_recipe(data, "fuzz")
    except ConfigError:
        pass


@_FUZZ
@given(data=_PASS)
def test_config_from_dict_succeeds_or_raises_config_error(data):
    try:
        Config.from_dict(data)
    except ConfigError:
        pass


_YAMLISH = st.lists(
    st.sampled_from(
        [
            "passes:",
            " - ",
            "{type: DistillConfig, lr: ",
            ".nan",
            ".inf",
            "&a ",
            "*a",
            "[",
            "]",
            "{",
            "}",
            "\n",
            "  ",
            ",",
            "!!python/name:os.system",
            "\x00",
            "é",
            "9" * 50,
            "<<: ",
            "'",
            '"',
            "? ",
            ": ",
            "!!timestamp ",
            "!!bool ",
            "!!int ",
            "!!binary ",
            "!!set ",
            "!!omap ",
            "%YAML 1.1\n",
            "---\n",
            "\t",
        ]
    ),
    max_size=40,
).map("".join)


@_FUZZ
@given(content=st.binary(max_size=512) | _YAMLISH.map(lambda s: s.encode("utf-8")))
def test_load_recipe_on_random_bytes_succeeds_or_raises_config_error(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yaml"
        path.write_bytes(content)
        try:
            load_recipe(path)
        except ConfigError:
            pass
