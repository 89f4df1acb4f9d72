"""Decoding, one way: every format and bit depth gives the model's channels in [0, 1] like its 8-bit twin, through
both readers; an image over the pixel limit is refused before it is decoded, in its own error row."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from oodlab.data.preprocessing import Preprocessing
from oodlab.data.sources import folder

READERS = ("torchvision", "pil")


def _base(h=40, w=48, seed=0):
    rng = np.random.default_rng(seed)
    smooth = np.add.outer(np.linspace(20, 220, h), np.linspace(0, 30, w))
    return np.clip(smooth + rng.normal(0, 3, (h, w)), 0, 255).astype(np.uint8)


def _variants(tmp_path, rgb: bool):
    """The same picture in many encodings: {name: path}; 'png8' is the reference."""
    g = _base()
    img = Image.fromarray(np.stack([g, 255 - g, g // 2], -1)) if rgb else Image.fromarray(g)
    out = {}
    out["png8"] = tmp_path / "png8.png"
    img.save(out["png8"])
    if not rgb:
        out["png16"] = tmp_path / "png16.png"
        Image.fromarray(g.astype(np.uint16) * 257).save(out["png16"])  # 16-bit samples spanning 0..65535
        out["la"] = tmp_path / "la.png"
        img.convert("LA").save(out["la"])
    out["palette"] = tmp_path / "palette.png"
    img.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(out["palette"])
    out["gif"] = tmp_path / "anim.gif"
    frames = [img.convert("P", palette=Image.Palette.ADAPTIVE), Image.new(img.mode, img.size, 0).convert("P")]
    frames[0].save(out["gif"], save_all=True, append_images=frames[1:], duration=50, loop=0)
    out["tiff"] = tmp_path / "img.tiff"
    img.save(out["tiff"])
    out["webp"] = tmp_path / "img.webp"
    img.save(out["webp"], lossless=True)
    if rgb:
        out["cmyk"] = tmp_path / "cmyk.jpg"
        img.convert("CMYK").save(out["cmyk"], quality=98)
    out["exif"] = tmp_path / "exif.jpg"
    rotated = img.transpose(Image.Transpose.ROTATE_270)  # stored rotated, with the tag (8) that turns it back
    exif = Image.Exif()
    exif[0x0112] = 8
    rotated.save(out["exif"], quality=98, exif=exif.tobytes())
    return out


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_encoding_decodes_like_its_8bit_twin(reader, channels, tmp_path):
    prep = Preprocessing(32, channels, 36, reader=reader)
    files = _variants(tmp_path, rgb=channels == 3)
    ref = prep.load(files["png8"])
    assert ref.shape == (channels, 32, 32) and ref.dtype == torch.float32
    for name, path in files.items():
        x = prep.load(path)
        assert x.shape == ref.shape and 0 <= float(x.min()) and float(x.max()) <= 1, name
        lossy = name in ("cmyk", "exif", "gif", "palette")  # JPEG, and 256-colour quantisation
        assert float((x - ref).abs().mean()) < (0.03 if lossy else 1.5 / 255), name


@pytest.mark.parametrize("reader", READERS)
def test_images_over_the_pixel_limit_are_refused_before_decoding(reader, tmp_path, monkeypatch):
    for i, size in enumerate(((20, 20), (200, 100))):
        Image.new("L", size, 100).save(tmp_path / f"{i}.png")
    monkeypatch.setenv("OODLAB_MAX_PIXELS", "10000")
    data = folder.load(tmp_path, prep=Preprocessing(16, 1, reader=reader))
    ok, label = data.dataset[0]
    assert int(label) == -1 and ok.shape == (1, 16, 16)
    import torchvision.io

    def never(*a, **k):
        raise AssertionError("the image over the limit was decoded")

    monkeypatch.setattr(Image.Image, "load", never)
    monkeypatch.setattr(torchvision.io, "decode_image", never)
    assert int(data.dataset[1][1]) == -2  # BROKEN: in its own error row, never decoded
    assert "20,000 pixels is over the limit of 10,000" in data.dataset.error(1)


def test_16bit_png_scores_as_its_8bit_twin(tmp_path):
    """`oodlab score` and `guard check` on a 16-bit PNG give its 8-bit twin's score (a mixed folder too)."""
    from oodlab.cli import main

    g = _base(28, 28)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(g).save(imgs / "a8.png")
    Image.fromarray(g.astype(np.uint16) * 257).save(imgs / "b16.png")
    Image.fromarray(g).convert("P").save(imgs / "c_palette.gif")
    Image.fromarray(g).save(imgs / "d.webp", lossless=True)
    assert main(["fit", "energy", "--out", str(tmp_path / "energy"), "--device", "cpu"]) == 0
    from oodlab.training.recipes import shipped_checkpoint

    ckpt = str(shipped_checkpoint("fashionmnist"))
    assert main(["score", str(tmp_path / "energy.safetensors"), str(imgs), "--model", ckpt, "--out",
                 str(tmp_path / "s.csv"), "--device", "cpu"]) == 0
    rows = [line.split(",") for line in (tmp_path / "s.csv").read_text().splitlines()[1:]]
    scores = {r[0].rsplit("/", 1)[-1]: float(r[1]) for r in rows}
    assert scores["b16.png"] == pytest.approx(scores["a8.png"], abs=1e-9)  # 16-bit samples scale exactly
    # grey WebP and palette GIF decode through RGB (a grey level may round one step): the same score within that
    assert all(v == pytest.approx(scores["a8.png"], abs=0.1) for v in scores.values()) and len(scores) == 4
    assert main(["guard", "build", "energy", "--alpha", "0.05", "--out", str(tmp_path / "g"), "--device", "cpu"]) == 0
    assert main(["guard", "check", str(tmp_path / "g"), str(imgs), "--out", str(tmp_path / "f.csv"), "--device", "cpu"]) == 0
    flags = [line.split(",") for line in (tmp_path / "f.csv").read_text().splitlines()[1:]]
    by = {r[0].rsplit("/", 1)[-1]: float(r[2]) for r in flags}
    assert by["b16.png"] == pytest.approx(by["a8.png"], abs=1e-9) and len(by) == 4
