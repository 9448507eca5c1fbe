"""PEFT target semantics (fedamole.targets): suffix lists, full-match regexes, "all-linear", exclude_modules, errors,
and MoLEConfig's target_modules / exclude_modules. PEFT itself is the reference (imported by the tests only)."""

import json
import warnings

import pytest
import torch
from test_models import tiny_bert, tiny_llama
from transformers import GPT2Config, GPT2LMHeadModel

import fedamole
from fedamole import MoLEConfig
from fedamole.targets import resolve_target_names, resolve_targets

LAYER0_QV = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def peft_targets(make_model, task_type=None, **lora_kwargs):
    """The module names PEFT's LoRA adapts on a fresh `make_model()`, without the PeftModel prefix."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's Conv1D: fan_in_fan_out warning
        model = get_peft_model(make_model(), LoraConfig(r=2, task_type=task_type, **lora_kwargs))
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_suffix_entries_match_whole_name_components():
    qs = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert resolve_target_names(tiny_llama(), ["q_proj"]) == qs
    assert resolve_target_names(tiny_llama(), ("self_attn.q_proj",)) == qs
    assert resolve_target_names(tiny_llama(), ["model.layers.1.self_attn.q_proj"]) == qs[1:]
    with pytest.raises(ValueError, match="match no module"):
        resolve_target_names(tiny_llama(), ["proj"])  # "q_proj" does not end with ".proj"


def test_string_is_a_full_match_regex():
    assert resolve_target_names(tiny_llama(), r".*\.layers\.0\..*(q|v)_proj") == LAYER0_QV
    with pytest.raises(ValueError, match="regex matched against the full dotted name"):
        resolve_target_names(tiny_llama(), "q_proj")  # a regex: must match the whole name


@pytest.mark.parametrize(
    "target_modules,exclude_modules",
    [
        (["q_proj", "v_proj"], None),
        (["self_attn.k_proj", "mlp.down_proj"], None),
        (r".*\.layers\.0\..*(q|v)_proj", None),
        (r".*_proj", ["o_proj", "layers.1.self_attn.q_proj"]),
        ("all-linear", r".*\.mlp\..*"),
        ("all-linear", ["k_proj", "gate_proj"]),
    ],
)
def test_matches_peft_on_llama(target_modules, exclude_modules):
    ours = resolve_target_names(tiny_llama(), target_modules, exclude_modules)
    assert len(ours) == len(set(ours))
    assert set(ours) == peft_targets(tiny_llama, target_modules=target_modules, exclude_modules=exclude_modules)


@pytest.mark.parametrize(
    "make_model,task_type,head",
    [(tiny_llama, "CAUSAL_LM", "lm_head"), (tiny_bert, "SEQ_CLS", "classifier"), (tiny_gpt2, "CAUSAL_LM", "lm_head")],
)
def test_all_linear_matches_peft_and_leaves_out_the_head(make_model, task_type, head):
    ours = resolve_target_names(make_model(), "all-linear")
    assert head not in ours and ours
    assert set(ours) == peft_targets(make_model, task_type, target_modules="all-linear")


def test_all_linear_details():
    names = resolve_target_names(tiny_gpt2(), "ALL-Linear")  # any case, like PEFT
    assert names[:4] == [f"transformer.h.0.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert "bert.pooler.dense" in resolve_target_names(tiny_bert(), "all-linear")  # only the head is left out
    plain = torch.nn.Sequential()  # no get_output_embeddings: a module named lm_head is the head
    plain.add_module("body", torch.nn.Linear(4, 4))
    plain.add_module("lm_head", torch.nn.Linear(4, 9))
    assert resolve_target_names(plain, "all-linear") == ["body"]
    plain.add_module("classifier", torch.nn.Linear(4, 2))
    assert resolve_target_names(plain, "all-linear") == ["body", "classifier"]  # lm_head found: classifier kept
    with pytest.raises(ValueError, match="none"):
        resolve_target_names(torch.nn.Sequential(torch.nn.ReLU()), "all-linear")


def test_exclude_modules_both_forms():
    model = tiny_llama()
    every_proj = [n for n in resolve_target_names(model, "all-linear") if "self_attn" in n]
    assert resolve_target_names(model, ["self_attn.q_proj", "v_proj"], ["layers.1.self_attn.q_proj"]) == [
        *LAYER0_QV,
        "model.layers.1.self_attn.v_proj",
    ]
    assert resolve_target_names(model, r".*self_attn\.\w+", r".*\.layers\.1\..*|.*\.(k|o)_proj") == LAYER0_QV
    assert resolve_target_names(model, r".*self_attn\.\w+_proj", "nothing") == every_proj
    with pytest.raises(ValueError, match="excludes every module"):
        resolve_target_names(model, ["q_proj"], ["self_attn.q_proj"])


def test_non_linear_match_raises_type_error_naming_it():
    with pytest.raises(TypeError, match=r"'model\.layers\.0\.self_attn' \(LlamaAttention\)"):
        resolve_target_names(tiny_llama(), ["self_attn"])
    pattern = r".*\.layers\.0\.(self_attn\.q_proj|mlp\.act_fn)"
    with pytest.raises(TypeError, match="act_fn.*nn.Linear and transformers Conv1D"):
        resolve_target_names(tiny_llama(), pattern)
    assert resolve_target_names(tiny_llama(), pattern, ["act_fn"]) == LAYER0_QV[:1]  # excluded: never type-checked


def test_nothing_matched_lists_the_linear_modules():
    with pytest.raises(ValueError, match=r"\['wq'\] match no module.*model\.layers\.\*\.self_attn\.k_proj"):
        resolve_target_names(tiny_llama(), ("wq",))
    with pytest.raises(ValueError, match=r"match no nn.Linear or Conv1D.*transformer\.h\.\*\.attn\.c_attn"):
        resolve_target_names(tiny_gpt2(), None)  # no default set fits GPT-2
    with pytest.raises(ValueError, match="exclude_modules does not accept 'all-linear'"):
        resolve_target_names(tiny_llama(), None, "all-linear")


def test_defaults_pick_the_first_matching_set():
    assert resolve_targets(tiny_llama(), None) == (
        ("q_proj", "v_proj"),
        [*LAYER0_QV, *[n.replace(".0.", ".1.") for n in LAYER0_QV]],
    )
    spec, names = resolve_targets(tiny_bert(), None, ["layer.1.attention.self.value"])
    assert spec == ("query", "value") and len(names) == 3


def test_inject_with_regex_and_exclude_then_save_load(tmp_path):
    config = MoLEConfig(num_experts=2, rank=2, target_modules=r".*self_attn\.\w+_proj", exclude_modules=["k_proj"])
    model = fedamole.inject_mole(tiny_llama(), config)
    assert sorted(fedamole.mole_modules(model)) == sorted(
        resolve_target_names(tiny_llama(), config.target_modules, config.exclude_modules)
    )
    assert model.fedamole_config == config
    fedamole.save_mole(model, tmp_path)
    loaded = fedamole.load_mole(tiny_llama(), tmp_path)
    assert sorted(fedamole.mole_modules(loaded)) == sorted(fedamole.mole_modules(model))
    assert loaded.fedamole_config == config


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"target_modules": "q_proj, v_proj"}, (("q_proj", "v_proj"), None)),
        ({"target_modules": "q_proj"}, ("q_proj", None)),  # no comma: a regex
        ({"target_modules": r"(q|v)_proj,x"}, (r"(q|v)_proj,x", None)),  # metacharacters: a regex
        ({"target_modules": "ALL-LINEAR", "exclude_modules": "k_proj, o_proj"}, ("all-linear", ("k_proj", "o_proj"))),
        (
            {"target_modules": [" q_proj", "self_attn.v_proj"], "exclude_modules": r".*\.1\..*"},
            (("q_proj", "self_attn.v_proj"), r".*\.1\..*"),
        ),
        ({"target_modules": {"v_proj", "q_proj"}}, (("q_proj", "v_proj"), None)),
        ({}, (None, None)),
    ],
)
def test_config_targets_normalize_and_round_trip(kwargs, expected):
    config = MoLEConfig(**kwargs)
    assert (config.target_modules, config.exclude_modules) == expected
    data = json.loads(json.dumps(config.to_dict()))
    assert all(not isinstance(data[k], tuple) for k in ("target_modules", "exclude_modules"))
    assert MoLEConfig.from_dict(data) == config
    assert MoLEConfig.from_dict({k: v for k, v in data.items() if k != "exclude_modules"}).exclude_modules is None


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("target_modules", [], "non-empty list"),
        ("target_modules", "", "empty string"),
        ("target_modules", "(q_proj", "not a valid regular expression"),
        ("target_modules", 5, "regex string"),
        ("target_modules", ["q_proj", ""], "non-empty module names"),
        ("target_modules", ["all-linear"], "pass it as the string itself"),
        ("exclude_modules", "all-linear", "does not accept 'all-linear'"),
        ("exclude_modules", ["all-linear"], "to target_modules"),
        ("exclude_modules", (), "non-empty list"),
        ("exclude_modules", "[", "not a valid regular expression"),
    ],
)
def test_config_validation_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=rf"MoLEConfig\.{field}.*{message}"):
        MoLEConfig(**{field: value})
