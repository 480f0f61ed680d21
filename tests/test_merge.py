"""Merging an adapter: plain transformers loads the result, and it matches the 4-bit base + adapter it replaces."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import fourbit
from fourbit.nn import qlora_layers
from fourbit.ship.merge import merge

IDS = torch.tensor([[5, 80, 120, 33, 7, 250, 19, 42]])


@pytest.fixture(scope="module")
def adapter_dir(tiny_adapter):
    return tiny_adapter


def unmerged_logits(tiny_llama, adapter_dir):
    model, _ = fourbit.load(tiny_llama, adapter=adapter_dir, progress=False)
    with torch.no_grad():
        return model(IDS).logits


def test_merge_into_dequantized_matches_base_plus_adapter(tiny_llama, adapter_dir, tmp_path):
    report = merge(str(tiny_llama), str(adapter_dir), tmp_path / "m", dtype="fp32", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # plain transformers, no fourbit involved
    with torch.no_grad():
        got = merged(IDS).logits
    torch.testing.assert_close(got, unmerged_logits(tiny_llama, adapter_dir), rtol=1e-4, atol=1e-4)
    assert report.mean_kl < 1e-6
    saved = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert saved["into"] == "dequantized" and saved["tokens"] > 0
    assert (tmp_path / "m" / "tokenizer.json").exists() and (tmp_path / "m" / "chat_template.jinja").exists()


def test_merge_modes_move_the_model_by_measured_amounts(tiny_llama, adapter_dir, tmp_path):
    bf16 = merge(str(tiny_llama), str(adapter_dir), tmp_path / "b", dtype="bf16", progress=False)
    original = merge(str(tiny_llama), str(adapter_dir), tmp_path / "o", dtype="fp32", into="original",
                     progress=False)  # fmt: skip
    requant = merge(str(tiny_llama), str(adapter_dir), tmp_path / "q", dtype="bf16", quantize="nf4", progress=False)
    # rounding to bf16 moves it a little; the original weights more; quantizing the merged weights again most
    assert 0 < bf16.mean_kl < original.mean_kl
    assert 0 < bf16.mean_kl < requant.mean_kl
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    requantized, _ = fourbit.load(tmp_path / "q", progress=False)  # the bitsandbytes 4-bit layout
    assert len(qlora_layers(requantized)) == 14


def test_merge_cli_and_errors(tiny_llama, adapter_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "fourbit.cli", "merge", "--model", str(tiny_llama), "--adapter",
                          str(adapter_dir), "--out", str(tmp_path / "c")], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "mean KL" in run.stdout and (tmp_path / "c" / "model.safetensors").exists()
    fourbit_q = tmp_path / "q4"
    from fourbit.models.quantize_checkpoint import quantize_checkpoint

    quantize_checkpoint(tiny_llama, fourbit_q, progress=False)
    with pytest.raises(ValueError, match="--into original needs a 16-bit checkpoint"):
        merge(str(fourbit_q), str(adapter_dir), tmp_path / "x", into="original", progress=False)
    assert not (tmp_path / "x").exists()
