"""minilm.distill on a small random MiniLM (the real tokenizer, the standard library's text): training helps."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viva_tensor import nn, quant
from viva_tensor.errors import ConfigError
from viva_tensor.models import _calibration, _distill, minilm

pytest.importorskip("optax")
pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def encoder():
    try:
        tokenizer = minilm.load_tokenizer(max_length=64)
    except Exception as e:  # noqa: BLE001 - the model package is not installed
        pytest.skip(f"no MiniLM tokenizer: {e}")
    cfg = minilm.MiniLMConfig(
        hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position_embeddings=64
    )
    model = minilm.MiniLM(cfg, rngs=nnx.Rngs(0))
    return minilm.SentenceEncoder(model, tokenizer, 64)


@pytest.fixture(scope="module")
def run(encoder):
    text = _calibration.calibration_text(300)
    traces = _distill._train_step._cache_size()
    student, report = minilm.distill(
        encoder, rank=4, steps=40, text=text, batch_size=16, learning_rate=5e-3, held_out=32, progress=True
    )
    return text, student, report, _distill._train_step._cache_size() - traces


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_training_raises_the_held_out_cosine(run):
    _, _, report, compiled = run
    assert compiled == 1  # one compilation for all 40 steps
    assert report.steps == 40 and len(report.losses) == 40
    assert report.held_out_cosine_after > report.held_out_cosine_before
    assert 1 - report.held_out_cosine_after < 0.7 * (1 - report.held_out_cosine_before)
    assert np.mean(report.losses[-5:]) < np.mean(report.losses[:5])
    assert "held-out cosine" in str(report)


def test_student_is_quantized_with_adapters_and_the_teacher_untouched(encoder, run):
    _, student, report, _ = run
    layers = [node for _, node in nnx.iter_graph(student.model) if isinstance(node, nn.LoRALinear)]
    assert len(layers) == 2 * 6
    assert all(isinstance(layer.base, nn.QLinear) for layer in layers)
    assert {layer.base.weight.get_value().format for layer in layers} == {"nf4"}
    want = sum(4 * (layer.in_features + layer.out_features) * 4 for layer in layers)
    assert report.adapter_bytes == want
    assert report.quantized_bytes == nn.param_bytes(nn.quantize_model(encoder.model, "nf4")[0])
    assert isinstance(encoder.model.layers[0].intermediate, nnx.Linear)  # the teacher is not changed


def test_held_out_cosine_before_is_that_of_the_quantized_model(encoder, run):
    text, _, report, _ = run
    ids, mask = _distill._tokens(encoder.tokenizer, text, 64)
    ids, mask = ids[-32:], mask[-32:]
    qmodel, _ = nn.quantize_model(encoder.model, "nf4")
    want = _cos(qmodel(jnp.asarray(ids), jnp.asarray(mask)), encoder.model(jnp.asarray(ids), jnp.asarray(mask)))
    assert report.held_out_cosine_before == pytest.approx(want.mean(), abs=1e-5)
    assert report.sentences[1] == 32


def test_adapters_merge_and_save(tmp_path, encoder, run):
    _, student, _, _ = run
    ids, mask = (jnp.asarray(a) for a in _distill._tokens(encoder.tokenizer, ["A man is eating food."] * 2, 64))
    merged = nn.merge_lora(student.model)
    np.testing.assert_allclose(np.asarray(merged(ids, mask)), np.asarray(student.model(ids, mask)), atol=1e-5)
    quant.save(tmp_path / "a.safetensors", nn.lora_state(student.model))
    again = nn.lora(nn.quantize_model(encoder.model, "nf4")[0], rank=4, rngs=nnx.Rngs(5))
    nn.load_lora_state(again, quant.load(tmp_path / "a.safetensors"))
    np.testing.assert_array_equal(np.asarray(again(ids, mask)), np.asarray(student.model(ids, mask)))


def test_zero_steps_and_bad_arguments(encoder):
    text = _calibration.calibration_text(80)
    student, report = minilm.distill(encoder, steps=0, text=text, held_out=16, batch_size=8, progress=False)
    assert report.losses == () and report.held_out_cosine_after == report.held_out_cosine_before
    x = jnp.ones((1, 8), jnp.int32)
    qmodel, _ = nn.quantize_model(encoder.model, "nf4")
    np.testing.assert_array_equal(np.asarray(student.model(x, x)), np.asarray(qmodel(x, x)))  # B = 0: exact
    with pytest.raises(ConfigError, match="text"):
        minilm.distill(encoder, steps=1, text=text[:10], progress=False)
    with pytest.raises(ConfigError, match="rank"):
        minilm.distill(encoder, rank=0, text=text, progress=False)
    with pytest.raises(ConfigError, match="steps"):
        minilm.distill(encoder, steps=-1, text=text, progress=False)
