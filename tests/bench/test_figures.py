import io

import numpy as np
import pytest
from PIL import Image

from oodlab.bench.figures import auroc_heatmap, detector_figure, heatmap_size, save_png, threshold_at_tpr
from oodlab.metrics import auroc, fpr_at_tpr


def test_threshold_known_answers():
    ids = np.arange(1.0, 21.0)  # 20 ID scores: accepting >= 2 accepts 19/20 = 95%
    assert threshold_at_tpr(ids) == 2.0
    assert threshold_at_tpr(np.arange(10.0)) == 0.0  # 95% of 10 needs all 10
    assert threshold_at_tpr(ids, tpr=0.5) == 11.0
    with pytest.raises(ValueError, match="tpr"):
        threshold_at_tpr(ids, tpr=0.0)


@pytest.mark.parametrize("seed", range(4))
def test_threshold_reproduces_fpr95(seed):
    rng = np.random.default_rng(seed)
    sid, sood = rng.normal(1.0, 1.0, 537), rng.normal(0.0, 1.0, 211)
    if seed % 2:  # heavy ties, as with saturated softmax scores
        sid, sood = sid.round(1), sood.round(1)
    thr = threshold_at_tpr(sid)
    assert np.mean(sid >= thr) >= 0.95
    assert np.mean(sood >= thr) == fpr_at_tpr(sid, sood)


def _png(fig) -> tuple[bytes, Image.Image]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue(), Image.open(io.BytesIO(buf.getvalue()))


def test_detector_figure_content_and_size(tmp_path):
    rng = np.random.default_rng(0)
    scores = {"id": rng.normal(5, 1, 400), "far": rng.normal(-20, 1, 100), "near": rng.normal(4, 1, 100)}
    fig = detector_figure(scores, "energy", "toy test")
    roc_ax, hist_ax = fig.axes[:2]
    labels = roc_ax.get_legend_handles_labels()[1]
    assert labels[1] == "far: AUROC 100.0, FPR95 0.0"
    near = f"near: AUROC {100 * auroc(scores['id'], scores['near']):.1f}, FPR95 {100 * fpr_at_tpr(scores['id'], scores['near']):.1f}"
    assert labels[2] == near
    thr_line = next(ln for ln in hist_ax.get_lines() if ln.get_label().startswith("95% TPR threshold"))
    assert thr_line.get_xdata()[0] == threshold_at_tpr(scores["id"])
    assert hist_ax.get_legend_handles_labels()[1][0] == "ID: toy test"
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in (roc_ax, hist_ax))
    path = save_png(fig, tmp_path / "sub" / "energy.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (1200, 480)
        assert "Software" not in im.info
    assert path.read_bytes() == save_png(detector_figure(scores, "energy", "toy test"), tmp_path / "again.png").read_bytes()


def test_detector_figure_needs_id_and_ood():
    with pytest.raises(ValueError, match="'id'"):
        detector_figure({"far": np.zeros(3)}, "x")
    with pytest.raises(ValueError, match="OOD"):
        detector_figure({"id": np.zeros(3)}, "x")


@pytest.mark.parametrize(("rows", "cols", "name", "size"), [(3, 4, "d", (760, 300)), (10, 5, "d", (860, 610)),
                                                       (1, 1, "d", (600, 300)), (2, 3, "x" * 39, (870, 300))])
def test_heatmap_size(rows, cols, name, size):
    values = np.linspace(40, 100, rows * cols).reshape(rows, cols)
    _, im = _png(auroc_heatmap([f"{name}{i}" for i in range(rows)], [f"o{j}" for j in range(cols)], values, "t"))
    assert im.size == size == tuple(round(100 * x) for x in heatmap_size(rows, cols, len(name) + 1))


def test_heatmap_writes_values_and_bolds_column_best():
    values = np.array([[99.04, 60.0], [70.0, 61.26]])
    fig = auroc_heatmap(["a", "b"], ["o", "mean"], values, "t")
    texts = {t.get_text(): t.get_fontweight() for t in fig.axes[0].texts}
    assert texts == {"99.0": "bold", "60.0": "normal", "70.0": "normal", "61.3": "bold"}
    with pytest.raises(ValueError, match=r"\(2, 1\)"):
        auroc_heatmap(["a", "b"], ["o"], values, "t")
