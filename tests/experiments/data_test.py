"""Embedded data: determinism, disjoint splits, teacher structures, bad input."""

import numpy as np
import pytest

from experiments import data


@pytest.mark.parametrize("domain", data.DOMAINS)
def test_text_splits_are_deterministic_and_disjoint(domain):
  train = data.load_text(domain, "train")
  validation = data.load_text(domain, "validation")
  assert train.dtype == np.uint8 and len(train) > 9 * len(validation) * 0.9
  np.testing.assert_array_equal(train, data.load_text(domain, "train"))
  whole = np.concatenate([train, validation])
  assert len(whole) > 300_000


def test_english_is_pydoc_and_python_is_stdlib():
  assert b"The " in bytes(data.load_text("english")[:20000])
  assert b"def " in bytes(data.load_text("python")[:20000])


def test_lm_batches_resume_exactly():
  corpus = data.load_text("english", "validation")
  full = data.lm_batches(corpus, 4, 16, seed=3)
  batches = [next(full)["tokens"] for _ in range(5)]
  resumed = data.lm_batches(corpus, 4, 16, seed=3, start_step=3)
  np.testing.assert_array_equal(next(resumed)["tokens"], batches[3])
  assert batches[0].shape == (4, 17) and batches[0].dtype == np.int32
  with pytest.raises(ValueError, match="too few"):
    next(data.lm_batches(corpus[:10], 2, 16, seed=0))


def test_topic_classification_split_and_labels():
  texts, labels, names = data.topic_classification("train", max_topics=10)
  val_texts, val_labels, val_names = data.topic_classification("validation", max_topics=10)
  assert names == val_names and len(names) == 10
  assert not set(texts) & set(val_texts)
  assert labels.max() < 10 and len(texts) == len(labels)


def test_digits():
  images, labels = data.digits("train")
  val_images, _ = data.digits("validation")
  assert images.shape[1:] == (8, 8, 1) and len(images) + len(val_images) == 1797
  assert 0.0 <= images.min() and images.max() <= 1.0


@pytest.mark.parametrize("kind", data.TEACHER_KINDS)
def test_teacher_update_structures(kind):
  rng = np.random.default_rng(0)
  w0 = rng.standard_normal((24, 16)).astype(np.float32)
  target = data.teacher_update(np.random.default_rng(1), w0, kind, rank=3, scale=0.5)
  update = target - w0
  if kind == "low_rank":
    assert np.linalg.matrix_rank(update, tol=1e-4) == 3
  if kind == "full_rank":
    assert np.linalg.matrix_rank(update, tol=1e-4) == 16
  if kind == "orthogonal":
    np.testing.assert_allclose(np.linalg.svd(target, compute_uv=False),
                               np.linalg.svd(w0, compute_uv=False), rtol=1e-4)
  if kind == "sparse":
    assert 0 < np.mean(np.abs(update) > 1e-7) < 0.2
  if kind == "frequency_sparse":
    coefficients = data._dct(24) @ update @ data._dct(16).T
    assert np.sum(np.abs(coefficients) > 1e-4) <= 3
  if kind != "orthogonal":
    np.testing.assert_allclose(np.linalg.norm(update), 0.5 * np.linalg.norm(w0), rtol=1e-4)


def test_bad_input(tmp_path):
  with pytest.raises(ValueError, match="Unknown text domain"):
    data.load_text("french")
  with pytest.raises(ValueError, match="val_fraction"):
    data.load_text("english", val_fraction=1.5)
  with pytest.raises(ValueError, match="Unknown teacher kind"):
    data.teacher_update(np.random.default_rng(0), np.ones((3, 3)), "diagonal")
  with pytest.raises(FileNotFoundError):
    data.load_local(str(tmp_path / "missing.txt"))
  (tmp_path / "x.csv").write_text("1,2")
  with pytest.raises(ValueError, match="Unsupported data file"):
    data.load_local(str(tmp_path / "x.csv"))
  np.savez(tmp_path / "a.npz", x=np.arange(3))
  np.testing.assert_array_equal(data.load_local(str(tmp_path / "a.npz"))["x"], np.arange(3))
  (tmp_path / "t.txt").write_bytes(b"abc")
  assert bytes(data.load_local(str(tmp_path / "t.txt"))) == b"abc"
