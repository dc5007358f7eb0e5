"""``minilm.load(folder)`` on a quantized checkpoint folder (config.json with a quantization_config): here a
bitsandbytes-FP4 one written by ``interop.save``; tools/llmcompressor_minilm.py does the same with a folder that
llm-compressor wrote (W4A16, pack-quantized) and compares with transformers + compressed-tensors."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from viva_tensor import interop, nf4, quant

minilm = pytest.importorskip("viva_tensor.models.minilm")


def test_bnb_fp4_folder_loads_with_the_decoded_weights(tmp_path):
    pytest.importorskip("tokenizers")
    from safetensors.numpy import load_file

    src = minilm.default_model_dir()
    weights = load_file(str(src / "model.safetensors"))
    name = "encoder.layer.0.attention.self.query.weight"
    key = name if name in weights else "bert." + name
    records = {k: nf4.quantize_fp4(jnp.asarray(v)) if k.startswith(("encoder.", "bert.encoder.")) and v.ndim == 2
               else v for k, v in weights.items()}
    interop.save(tmp_path, records, kind="bnb", config=json.loads((src / "config.json").read_text()))
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
              "sentence_bert_config.json"):
        if (src / f).exists():
            shutil.copy(src / f, tmp_path / f)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "fp4"
    encoder = minilm.load(tmp_path)
    kernel = np.asarray(encoder.model.layers[0].attention.query.kernel[...])
    np.testing.assert_array_equal(kernel.T, np.asarray(quant.dequantize(records[key])))
    s = ["A man is eating food.", "The weather is lovely today."]
    ours, ref = np.asarray(minilm.encode(encoder, s)), np.asarray(minilm.encode(minilm.load(), s))
    cos = (ours * ref).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.8  # 4-bit FP4 everywhere in the encoder: close, not equal
