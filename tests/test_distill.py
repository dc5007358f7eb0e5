"""minilm.distill on a small random MiniLM (the real tokenizer, the standard library's text): training helps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viva_tensor import nn, quant
from viva_tensor.errors import ConfigError
from viva_tensor.models import _calibration, _distill, minilm

pytest.importorskip("optax")
pytest.importorskip("tokenizers")

FIXTURE = "tests/data/minilm_reference.npz"

# One worker for the whole file under `pytest -n 2 --dist loadgroup`: its module fixtures (a 40-step run, four
# step-0 students) are then built once, not once per worker. The README's `--dist load` ignores the group (each
# worker that runs a test of this file builds them; their set-ups measured 12 s and 11 s in one run).
pytestmark = pytest.mark.xdist_group("distill")

PARTS = ("lora", "bias", "norm")  # what the 40-step run trains: adapters, biases, LayerNorms


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
    student, report = minilm.distill(  # from round to nearest and B = 0: far from the teacher, training shows
        encoder, rank=4, steps=40, text=text, batch_size=8, learning_rate=5e-3, held_out=32, progress=True,
        base="rtn", init="zero", train=PARTS, bias_learning_rate=1e-2, adapter_dtype=jnp.bfloat16,
    )  # fmt: skip
    return text, student, report, _distill._train_step._cache_size() - traces


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@nnx.jit
def _embed(model, ids, mask):
    """The model's sentence embeddings, jitted (eager calls dispatch op by op: slow on a loaded CPU)."""
    return model(ids, mask)


def _padded(tokenizer, texts, length=64):
    seqs = _distill._encode(tokenizer, texts, length)
    ids = np.zeros((len(seqs), length), np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return jnp.asarray(ids), jnp.asarray(mask)


def test_training_raises_the_held_out_cosine(run):
    _, _, report, compiled = run
    assert compiled == 1  # one compilation for all 40 steps
    assert report.steps == 40 and len(report.losses) == 40 and report.method == "lora"
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
    assert {layer.lora_a.get_value().dtype for layer in layers} == {jnp.dtype(jnp.bfloat16)}  # adapter_dtype
    lora_bytes = sum(4 * (layer.in_features + layer.out_features) * 2 for layer in layers)
    norms = [node for _, node in nnx.iter_graph(student.model) if isinstance(node, nnx.LayerNorm)]
    assert len(norms) == 1 + 2 * 2
    extra = 4 * (sum(layer.out_features for layer in layers) + sum(2 * n.scale.get_value().size for n in norms))
    assert report.adapter_bytes == lora_bytes + extra  # the trained biases and norms count (float32)
    assert sum(v.nbytes for v in jax.tree_util.tree_leaves(nn.lora_state(student.model, PARTS))) == extra + lora_bytes
    rtn = nn.quantize_model(encoder.model, "nf4")[0]
    assert report.quantized_bytes == nn.param_bytes(rtn)
    assert isinstance(encoder.model.layers[0].intermediate, nnx.Linear)  # the teacher is not changed
    q, t = student.model.layers[0], encoder.model.layers[0]
    for trained, start in ((q.intermediate.base.bias, t.intermediate.bias), (q.output_norm.scale, t.output_norm.scale)):
        assert not np.array_equal(np.asarray(trained.get_value()), np.asarray(start.get_value()))
    np.testing.assert_array_equal(  # the frozen NF4 codes are round to nearest's, untouched
        np.asarray(q.intermediate.base.weight.get_value().codes),
        np.asarray(rtn.layers[0].intermediate.weight.get_value().codes),
    )
    np.testing.assert_array_equal(  # the embeddings were not trained
        np.asarray(student.model.embeddings.word.embedding.get_value()),
        np.asarray(encoder.model.embeddings.word.embedding.get_value()),
    )


@pytest.fixture(scope="module")
def starts(encoder):
    """The students at step 0 of every base and initialisation (on the text of ``run``)."""
    text = _calibration.calibration_text(300)
    out = {}
    for base, init in (("rtn", "zero"), ("rtn", "calibrated"), (None, None), ("rtn", "svd")):
        student, report = minilm.distill(
            encoder, rank=4, steps=0, text=text, batch_size=8, held_out=32, base=base, init=init, progress=False
        )
        out[report.base, report.init] = student, report
    return out


def test_held_out_cosines_are_those_of_the_models_on_the_last_texts(encoder, run, starts):
    text, student, report, _ = run
    ids, mask = _padded(encoder.tokenizer, text[-32:])
    teacher = _embed(encoder.model, ids, mask)
    start = starts["rtn", "zero"][0].model
    assert report.held_out_cosine_before == pytest.approx(_cos(_embed(start, ids, mask), teacher).mean(), abs=1e-5)
    assert report.held_out_cosine_after == pytest.approx(
        _cos(_embed(student.model, ids, mask), teacher).mean(), abs=1e-5
    )
    assert report.sentences == (300 - 32, 32)
    assert report.prepare_cpu_seconds > 0 and report.total_cpu_seconds > report.cpu_seconds
    for (_, init), (model, start_report) in starts.items():  # each start's held-out cosine is its model's
        got = _cos(_embed(model.model, ids, mask), teacher).mean()
        assert start_report.held_out_cosine_before == pytest.approx(got, abs=1e-5), init
        assert start_report.held_out_cosine_after == start_report.held_out_cosine_before
        assert start_report.losses == () and start_report.steps == 0


def _zero_adapters(model):
    base = nnx.clone(model)
    for _, layer in nn._lora._layers(base, (nn.LoRALinear,)):
        layer.lora_b.set_value(jnp.zeros_like(layer.lora_b.get_value()))
    return base


def test_gptq_base_and_calibrated_start_beat_round_to_nearest_at_step_zero(encoder, starts):
    assert ("gptq", "calibrated") in starts  # distill's defaults
    cos = {key: report.held_out_cosine_before for key, (_, report) in starts.items()}
    text = _calibration.calibration_text(300)
    ids, mask = _padded(encoder.tokenizer, text[-32:])
    student = _zero_adapters(starts["gptq", "calibrated"][0].model)  # the frozen GPTQ base alone
    cos["gptq", "zero"] = _cos(_embed(student, ids, mask), _embed(encoder.model, ids, mask)).mean()
    assert cos["rtn", "calibrated"] > cos["rtn", "svd"] > cos["rtn", "zero"]
    assert cos["gptq", "zero"] > cos["rtn", "zero"]
    assert cos["gptq", "calibrated"] > cos["gptq", "zero"]
    gptq, _ = minilm.quantize(encoder, fmt="nf4", calibration=text[:268])
    mine = [layer.base for _, layer in nn._lora._layers(student, (nn.LoRALinear,))]
    theirs = [node for _, node in nnx.iter_graph(gptq.model) if isinstance(node, nn.QLinear)]
    assert len(mine) == len(theirs) == 12
    for a, b in zip(mine, theirs, strict=True):  # the frozen base is GPTQ's NF4 record, bit for bit
        assert a.weight.get_value().format == "nf4"
        for x, y in zip(jax.tree_util.tree_leaves(a.weight.get_value()),
                        jax.tree_util.tree_leaves(b.weight.get_value()), strict=True):  # fmt: skip
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_packed_rows_hold_every_text_once_and_each_attends_to_itself(encoder):
    texts = _calibration.calibration_text(40) + ["", "ok", "Hello there, this is a test."]
    seqs = _distill._encode(encoder.tokenizer, texts, 64)
    ids, seg = _distill._pack(seqs, 64, 16)
    got = sorted(tuple(ids[r][seg[r] == s]) for r in range(len(ids)) for s in range(1, seg[r].max() + 1))
    assert got == sorted(tuple(s) for s in seqs)
    for row in seg:  # the texts one after the other from the row's start, then padding
        k = int((row > 0).sum())
        assert (
            (row[:k] > 0).all()
            and (np.diff(row[:k]) >= 0).all()
            and np.array_equal(np.unique(row[:k]), np.arange(1, row.max() + 1))
        )
    hidden = nnx.jit(_distill._states)(encoder.model, jnp.asarray(ids), jnp.asarray(seg))
    r, s = 0, int(seg[0].max())
    one = jnp.asarray(ids[r][seg[r] == s])[None]
    alone = nnx.jit(lambda m, i, k: m.hidden_states(i, k))(encoder.model, one, jnp.ones(one.shape, jnp.int32))
    np.testing.assert_allclose(np.asarray(hidden[r][seg[r] == s]), np.asarray(alone[0]), atol=2e-5)
    long = _distill._encode(encoder.tokenizer, [" ".join(["word"] * 100)], 64)[0]
    assert len(long) == 64 and long[-1] == seqs[-1][-1]  # cut, [SEP] kept


def test_qat_trains_the_kernels_and_freezes_them(encoder):
    text = _calibration.calibration_text(200)
    student, report = minilm.distill(
        encoder, method="qat", fmt="q4_0", steps=15, text=text, batch_size=8, learning_rate=2e-3, held_out=32,
        progress=False,
    )  # fmt: skip
    assert report.method == "qat" and report.rank == 0 and report.adapter_bytes == 0
    assert report.held_out_cosine_after > report.held_out_cosine_before
    layers = [node for _, node in nnx.iter_graph(student.model) if isinstance(node, nn.QLinear)]
    assert len(layers) == 12 and {layer.weight.get_value().format for layer in layers} == {"q4_0"}
    assert report.quantized_bytes == nn.param_bytes(student.model)
    ids, mask = _padded(encoder.tokenizer, text[-32:])
    after = _cos(_embed(student.model, ids, mask), _embed(encoder.model, ids, mask)).mean()
    assert report.held_out_cosine_after == pytest.approx(after, abs=1e-4)  # the frozen model is what was trained
    np.testing.assert_array_equal(  # the embeddings were not trained
        np.asarray(student.model.embeddings.word.embedding.get_value()),
        np.asarray(encoder.model.embeddings.word.embedding.get_value()),
    )


def test_package_text_is_plain_and_never_the_evaluation_sentences():
    paragraphs, messages = _distill._package_text()
    assert len(paragraphs) > 10  # jax, flax, numpy ... all have long descriptions
    joined = "\n".join(paragraphs + messages)
    for marker in ("```", "](http", ".. code", ">>> ", "<img", "<div"):
        assert marker not in joined, marker
    evaluation = [str(s) for s in np.load(FIXTURE)["sentences"] if len(str(s)) > 3]
    assert not [s for s in evaluation if s in joined]
    default = _distill._default_text(0)
    assert not [s for s in evaluation if s in default]
    assert set(_calibration.calibration_text()) <= set(default)


def test_markup_is_stripped():
    md = (
        "# A Title\n\nSome **bold** and `code` with a [link](https://x.org) and ![img](a.png).\n\n"
        "```python\nx = 1\n```\n\n    indented = code\n\nA second paragraph\nover two lines.\n"
    )
    assert _distill._clean(md) == [
        "A Title", "Some bold and code with a link and .", "A second paragraph over two lines.",
    ]  # fmt: skip
    rst = "Two Words\n=========\n\nText with ``literal`` and `a link <https://x.org>`_.\n\n"
    rst += ".. code-block::\n\n   x = 1\n"
    assert _distill._clean(rst) == ["Two Words", "Text with literal and a link."]


def test_adapters_merge_and_save(tmp_path, encoder, run):
    _, student, _, _ = run
    ids, mask = _padded(encoder.tokenizer, ["A man is eating food."] * 2)
    merged = nn.merge_lora(student.model)
    want = np.asarray(_embed(student.model, ids, mask))
    np.testing.assert_allclose(np.asarray(_embed(merged, ids, mask)), want, atol=1e-5)
    quant.save(tmp_path / "a.safetensors", nn.lora_state(student.model, PARTS))
    again = _zero_adapters(student.model)
    for _, node in nnx.iter_graph(again):  # the norms back at their start: the saved state must restore them
        if isinstance(node, nnx.LayerNorm):
            node.scale.set_value(jnp.ones_like(node.scale.get_value()))
    assert not np.allclose(np.asarray(_embed(again, ids, mask)), want)
    nn.load_lora_state(again, quant.load(tmp_path / "a.safetensors"), PARTS)
    np.testing.assert_array_equal(np.asarray(_embed(again, ids, mask)), want)


def test_zero_steps_and_bad_arguments(encoder, starts):
    text = _calibration.calibration_text(80)
    student, report = starts["rtn", "zero"]  # steps=0, round to nearest, B = 0
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
    with pytest.raises(ConfigError, match="method"):
        minilm.distill(encoder, method="full", text=text, progress=False)
    with pytest.raises(ConfigError, match="base"):
        minilm.distill(encoder, method="qat", base="gptq", text=text, progress=False)
    with pytest.raises(ConfigError, match="init"):
        minilm.distill(encoder, init="loftq", text=text, progress=False)
    with pytest.raises(ConfigError, match="train"):
        minilm.distill(encoder, train=("lora", "kernel"), text=text, progress=False)


def test_sentence_loss_counts_each_text_once_and_weights_the_worst():
    rng = np.random.default_rng(0)
    cos = rng.uniform(0.5, 1.0, (3, 7)).astype(np.float32)
    real = (rng.uniform(size=(3, 7)) < 0.7).astype(np.float32)
    d = (1.0 - cos.astype(np.float64)) * real
    n = real.sum()
    for w in (0.0, 1.5):
        want = d.sum() / n + (w * (d * d).sum() / d.sum() if w else 0.0)
        assert float(_distill._sentence_loss(jnp.asarray(cos), jnp.asarray(real), w)) == pytest.approx(want, rel=1e-5)
        grad = jax.grad(_distill._sentence_loss)(jnp.asarray(cos), jnp.asarray(real), w)
        # d loss / d cos_i = -(1 / n + w d_i / sum d) for a real text (the weights d held constant), 0 for padding
        np.testing.assert_allclose(np.asarray(grad), -real * (1 / n + w * d / d.sum()), rtol=1e-5, atol=1e-7)


def test_odd_texts_are_what_they_say():
    lines = _distill._doctest_lines()
    assert len(lines) > 100 and not [s for s in lines if s.startswith((">>>", "...")) or not 1 <= len(s) <= 120]
    numeric = _distill._numeric_lines()
    assert numeric and all(any(c.isdigit() for c in s) and len(s) <= 100 for s in numeric)
    questions = _distill._questions(_distill._package_text()[0])
    assert questions and all(s.endswith(("?", "!")) for s in questions)
    rng = np.random.default_rng(0)
    spans = _distill._spans(["one two three four five six seven eight nine ten"], 50, rng, 8)
    assert {len(s.split()) for s in spans} == set(range(1, 9))
    assert all(s in "one two three four five six seven eight nine ten" for s in spans)
    mixed = _distill._mixed_text(0, short_share=0.35)
    assert len(set(mixed)) == len(mixed)
    assert sum(len(s.split()) <= 8 for s in mixed) >= 0.35 * len(mixed)
    evaluation = [str(s) for s in np.load(FIXTURE)["sentences"] if len(str(s)) > 3]
    assert not [s for s in evaluation if s in set(mixed)]
