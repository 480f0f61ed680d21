"""PEFT adapters both ways (the real PEFT as the oracle), several adapters on one base, clear errors."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

import fourbit
from fourbit.models.adapters import AdapterError, add_adapter, save_adapter
from fourbit.nn import adapter_routing, qlora_layers, set_active_adapters

IDS = torch.tensor([[5, 80, 120, 33, 7, 250, 19, 42]])


def dense_twin(folder, model):
    """transformers' model with fourbit's dequantized weights: the base PEFT should wrap to agree with fourbit."""
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for name, layer in qlora_layers(model).items():
        ref.get_submodule(name).weight.data = layer.dense_weight(dtype=torch.float32)
    return ref


def randomize(model, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qlora_layers(model).values():
            if name in layer.lora_B:
                layer.lora_B[name].weight.normal_(0, 0.05, generator=g)


def logits(model, **kw):
    with torch.no_grad():
        return model(IDS, **kw).logits


def test_fourbit_adapter_loads_in_peft(tiny_llama, tmp_path):
    model, _ = fourbit.load(tiny_llama, progress=False)
    add_adapter(model, "default", r=4, alpha=8, target="q_proj,v_proj,down_proj")
    randomize(model)
    save_adapter(model, tmp_path / "a", base_model=str(tiny_llama))
    peft_model = PeftModel.from_pretrained(dense_twin(tiny_llama, model), tmp_path / "a")
    ours, theirs = logits(model), logits(peft_model)
    assert (ours - logits(dense_twin(tiny_llama, model))).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"] and config["r"] == 4


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_in_fourbit(tiny_llama, tmp_path, use_rslora):
    model, _ = fourbit.load(tiny_llama, progress=False)
    base = dense_twin(tiny_llama, model)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"],
                        use_rslora=use_rslora, rank_pattern={"layers.1.mlp.up_proj": 4},
                        alpha_pattern={"o_proj": 4}, task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(tmp_path / "p")
    theirs = logits(peft_model)
    model_with, _ = fourbit.load(tiny_llama, adapter=tmp_path / "p", progress=False)
    torch.testing.assert_close(logits(model_with), theirs, rtol=1e-4, atol=1e-4)
    up = model_with.get_submodule("model.layers.1.mlp.up_proj")
    assert up.lora_A["default"].out_features == 4


def test_many_adapters_switch_without_reload(tiny_llama, tmp_path):
    model, _ = fourbit.load(tiny_llama, progress=False)
    for i, name in enumerate(["a", "b"]):
        add_adapter(model, name, r=4, alpha=8)
        randomize(model, name, seed=i)
        save_adapter(model, tmp_path / name, name)
    multi, _ = fourbit.load(tiny_llama, adapter={"a": tmp_path / "a", "b": tmp_path / "b"}, progress=False)
    set_active_adapters(multi, None)
    base = logits(multi)
    set_active_adapters(multi, "a")
    only_a = logits(multi)
    set_active_adapters(multi, "b")
    only_b = logits(multi)
    set_active_adapters(multi, {"a": 0.5, "b": 0.5})
    mixed = logits(multi)
    assert not torch.allclose(only_a, only_b) and not torch.allclose(base, only_a)
    # a weighted combination is the adapters' deltas weighted, at the level of each layer's output
    layer = qlora_layers(multi)["model.layers.0.self_attn.q_proj"]
    x = torch.randn(3, layer.in_features)
    layer.set_active({"a": 0.5, "b": 0.5})
    y_mix = layer(x)
    layer.set_active(None)
    y0 = layer(x)
    layer.set_active("a")
    ya = layer(x)
    layer.set_active("b")
    yb = layer(x)
    torch.testing.assert_close(y_mix, y0 + 0.5 * (ya - y0) + 0.5 * (yb - y0), rtol=1e-5, atol=1e-6)
    assert mixed.shape == base.shape
    # switching allocates nothing new: the set of tensors held by the model is unchanged
    held = {t.data_ptr() for t in list(multi.parameters()) + list(multi.buffers())}
    for _ in range(5):
        set_active_adapters(multi, "a")
        set_active_adapters(multi, "b")
        set_active_adapters(multi, None)
    assert {t.data_ptr() for t in list(multi.parameters()) + list(multi.buffers())} == held


def test_per_row_routing_equals_rows_alone(tiny_llama):
    model, _ = fourbit.load(tiny_llama, progress=False)
    for i, name in enumerate(["a", "b"]):
        add_adapter(model, name, r=4, alpha=8)
        randomize(model, name, seed=i)
    batch = torch.randint(0, 250, (4, 7))
    plan = ["a", "b", None, "a"]
    with adapter_routing(model, plan):
        together = logits_of(model, batch)
    for row, name in enumerate(plan):
        set_active_adapters(model, name)
        alone = logits_of(model, batch[row : row + 1])
        torch.testing.assert_close(together[row : row + 1], alone, rtol=1e-5, atol=1e-5)


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _peft_folder(tmp_path, tiny_llama, **config):
    model, _ = fourbit.load(tiny_llama, progress=False)
    peft_model = get_peft_model(dense_twin(tiny_llama, model), LoraConfig(task_type="CAUSAL_LM", **config))
    peft_model.save_pretrained(tmp_path / "x")
    return tmp_path / "x"


def test_dora_is_refused(tiny_llama, tmp_path):
    folder = _peft_folder(tmp_path, tiny_llama, r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(AdapterError, match=r"adapter_config\.json.*use_dora.*DoRA"):
        fourbit.load(tiny_llama, adapter=folder, progress=False)


def test_modules_to_save_is_refused(tiny_llama, tmp_path):
    folder = _peft_folder(tmp_path, tiny_llama, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(AdapterError, match="modules_to_save"):
        fourbit.load(tiny_llama, adapter=folder, progress=False)


def test_adapter_for_another_base_is_refused(tiny_llama, tmp_path):
    other = save_tiny_model(tmp_path / "wide", "llama", hidden_size=96, num_attention_heads=4)
    model, _ = fourbit.load(other, progress=False)
    add_adapter(model, "default", r=4, alpha=8, target="q_proj")
    save_adapter(model, tmp_path / "wide-adapter")
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: key .*q_proj\.lora_A\.weight.*do not fit"):
        fourbit.load(tiny_llama, adapter=tmp_path / "wide-adapter", progress=False)


def test_fourbit_adapter_on_a_bitsandbytes_4bit_base_in_peft(tiny_llama, tmp_path):
    import warnings

    from transformers import BitsAndBytesConfig

    model, _ = fourbit.load(tiny_llama, progress=False)
    add_adapter(model, "default", r=4, alpha=8)
    randomize(model)
    save_adapter(model, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
        base = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=config, device_map="cpu",
                                                    dtype=torch.float32)  # fmt: skip
        peft_model = PeftModel.from_pretrained(base, tmp_path / "a")
    ours, theirs = logits(model), logits(peft_model)
    # the same 4-bit weights (bitsandbytes computes in bf16 on this CPU, hence the tolerance) and the same adapter
    assert (ours - theirs).abs().max() < 0.05 * ours.abs().max()
    assert (ours - logits(dense_twin(tiny_llama, model))).abs().max() > 0.05 * ours.abs().max() * 0.2
