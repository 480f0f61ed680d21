"""Loading Hugging Face checkpoints in 4 bits, the bitsandbytes checkpoint layout both ways, and bad input."""

import json
import re
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

import fourbit
from fourbit.models.loader import CheckpointError
from fourbit.models.quantize_checkpoint import quantize_checkpoint
from fourbit.nn import QLoRALinear

ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_model(root / arch, arch) for arch in ARCHITECTURES}


def dequantized_reference(folder, model):
    """transformers' own model from the same folder, with every quantized weight replaced by fourbit's dequantized
    values: what the 4-bit model must compute."""
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for name, module in model.named_modules():
        if isinstance(module, QLoRALinear):
            ref.get_submodule(name).weight.data = module.dense_weight(dtype=torch.float32)
    return ref


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_load_matches_transformers_on_dequantized_weights(tiny_dirs, arch):
    model, tokenizer = fourbit.load(tiny_dirs[arch], progress=False)
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    n_linear = 7 if arch != "phi3" else 4  # phi3 fuses qkv and gate/up
    assert len(layers) == 2 * n_linear
    assert model.get_output_embeddings().weight.dtype == torch.float32  # head stays in compute dtype
    ids = tokenizer("Hello, 4-bit world!", return_tensors="pt")["input_ids"]
    ref = dequantized_reference(tiny_dirs[arch], model)
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and the 4-bit error is visible but small against the original weights
    orig = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], dtype=torch.float32)
    with torch.no_grad():
        want_orig = orig(ids).logits
    cosine = torch.nn.functional.cosine_similarity(want_orig.flatten(), got.flatten(), dim=0)
    assert not torch.equal(want_orig, got) and cosine > 0.8


def test_labels_and_generate_work(tiny_dirs):
    model, tokenizer = fourbit.load(tiny_dirs["llama"], progress=False)
    ids = tokenizer("abc abc abc", return_tensors="pt")["input_ids"]
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5


def test_quantized_bytes_equal_bitsandbytes(tiny_dirs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as bnb_f
    model, _ = fourbit.load(tiny_dirs["llama"], progress=False)
    original = load_file(tiny_dirs["llama"] / "model.safetensors")
    w = original["model.layers.1.mlp.down_proj.weight"]
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = model.get_submodule("model.layers.1.mlp.down_proj").weight_4bit
    assert torch.equal(q.packed, packed.reshape(-1))
    assert torch.equal(q.absmax, state.absmax)


@pytest.fixture(scope="module")
def bnb_available():
    pytest.importorskip("bitsandbytes")


def _bnb_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)  # fmt: skip


def test_fourbit_checkpoint_loads_in_transformers_bnb(tiny_dirs, tmp_path, bnb_available):
    out = quantize_checkpoint(tiny_dirs["llama"], tmp_path / "q4", progress=False)
    # the bytes are those bitsandbytes makes from the original weights, quantized by transformers itself
    theirs = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], quantization_config=_bnb_config(),
                                                  device_map="cpu")  # fmt: skip
    their_state = {k: v for k, v in theirs.state_dict().items()}
    with safe_open(out / "model.safetensors", framework="pt") as f:
        for key in f.keys():
            if key.endswith("q_proj.weight") or key.endswith("q_proj.weight.absmax"):
                assert torch.equal(f.get_tensor(key).reshape(-1), their_state[key].reshape(-1)), key
    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    ours, _ = fourbit.load(out, progress=False)
    ids = torch.tensor([[5, 80, 120, 33, 7, 250]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits.float(), ours(ids).logits, rtol=0, atol=5e-2)  # bnb on CPU computes in bf16


def test_transformers_bnb_checkpoint_loads_in_fourbit(tiny_dirs, tmp_path, bnb_available):
    theirs = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"], quantization_config=_bnb_config(),
                                                  device_map="cpu")  # fmt: skip
    theirs.save_pretrained(tmp_path / "bnb")  # before any forward: a CPU forward repacks bnb's weights
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / "bnb" / name).write_bytes((tiny_dirs["qwen2"] / name).read_bytes())
    ours, _ = fourbit.load(tmp_path / "bnb", progress=False)
    ids = torch.tensor([[5, 80, 120, 33, 7, 250]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits.float(), rtol=0, atol=5e-2)


# --- bad input: one clear error naming the file or tensor -------------------------------------------------------


def copy_of(folder, dest):
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_missing_folder():
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        fourbit.load("no-such-model")


def test_truncated_safetensors(tiny_dirs, tmp_path):
    bad = copy_of(tiny_dirs["llama"], tmp_path / "trunc")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        fourbit.load(bad, progress=False)


def test_shape_disagrees_with_config(tiny_dirs, tmp_path):
    bad = copy_of(tiny_dirs["llama"], tmp_path / "shape")
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 192
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight has shape \[128, 64\].*\[192, 64\]"):
        fourbit.load(bad, progress=False)


def test_missing_tensor(tiny_dirs, tmp_path):
    bad = copy_of(tiny_dirs["llama"], tmp_path / "missing")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        fourbit.load(bad, progress=False)


def test_unsupported_architecture(tiny_dirs, tmp_path):
    bad = copy_of(tiny_dirs["llama"], tmp_path / "arch")
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "no-such-arch"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json"):
        fourbit.load(bad, progress=False)


def test_compute_dtype_is_measured_once_and_remembered(tmp_path):
    import subprocess
    import sys

    code = ("from fourbit.models.loader import default_compute_dtype; import torch; "
            "print(default_compute_dtype('cpu'))")  # fmt: skip
    env = {k: v for k, v in __import__("os").environ.items() if k != "FOURBIT_COMPUTE_DTYPE"}
    env["FOURBIT_CACHE"] = str(tmp_path)
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert first.stdout.strip() in ("torch.float32", "torch.bfloat16")
    remembered = json.loads((tmp_path / "compute_dtype.json").read_text())
    assert list(remembered.values()) == [first.stdout.strip().removeprefix("torch.")]
    env["FOURBIT_COMPUTE_DTYPE"] = "bfloat16"
    forced = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert forced.stdout.strip() == "torch.bfloat16"


def test_prequantized_checkpoint_loads_without_bitsandbytes(tiny_dirs, tmp_path):
    import subprocess
    import sys

    out = quantize_checkpoint(tiny_dirs["llama"], tmp_path / "q4", progress=False)
    ours, _ = fourbit.load(out, progress=False)
    expected = ours(torch.tensor([[5, 80, 120]])).logits[0, -1].tolist()
    code = (
        "import sys, json, torch; sys.modules['bitsandbytes'] = None\n"  # any import of bitsandbytes now fails
        "import fourbit\n"
        f"m, _ = fourbit.load({str(out)!r}, progress=False)\n"
        "print(json.dumps(m(torch.tensor([[5, 80, 120]])).logits[0, -1].tolist()))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == pytest.approx(expected, abs=1e-5)


def test_gguf_that_is_not_a_model_is_one_clear_error(tmp_path):
    import gguf

    bogus = tmp_path / "garbage.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match="garbage.gguf"):
        fourbit.load(bogus, progress=False)
    writer = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="bert.gguf"):
        fourbit.load(tmp_path / "bert.gguf", progress=False)


@pytest.mark.parametrize("double_quant", [True, False])
def test_non_finite_scale_in_4bit_checkpoint(tiny_dirs, tmp_path, double_quant):
    """A NaN block scale in a pre-quantized checkpoint is refused at load, naming the tensor and the block, instead of
    decoding its block to NaN (or to zero where the decode rounds to bf16)."""
    out = quantize_checkpoint(tiny_dirs["llama"], tmp_path / "q4", double_quant=double_quant, progress=False)
    tensors = load_file(out / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight." + ("nested_absmax" if double_quant else "absmax")
    tensors[key][0] = float("nan")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(key) + r"\[0\] is nan; scales must be finite"):
        fourbit.load(out, progress=False)
