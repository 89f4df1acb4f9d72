"""RankFeat: the rank-1 removal by a second route (the SVD's other terms), and the score it feeds."""

import torch
import torch.nn.functional as F

from oodlab.detectors import create
from oodlab.detectors.rankfeat import remove_rank1


def test_removing_rank1_leaves_the_other_singular_terms():
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(3, 5, 4, 4, generator=g)
    got = remove_rank1(fmap)
    for x, r in zip(fmap.double().flatten(2), got.flatten(2)):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        torch.testing.assert_close(r, (u[:, 1:] * s[1:]) @ vh[1:], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(torch.linalg.svdvals(r)[:-1], s[1:], rtol=1e-8, atol=1e-8)  # the top one is gone


def test_score_is_energy_of_the_pooled_edited_map(tiny):
    det = create("rankfeat").fit_on(tiny.model, None, device="cpu")
    x = torch.stack([tiny.ood_set.dataset[i][0] for i in range(len(tiny.ood_set))])
    with torch.no_grad():
        fmap = tiny.model.feature_map(x).double()
        edited = torch.stack([m - torch.linalg.svd(m)[1][0] * torch.outer(torch.linalg.svd(m)[0][:, 0],
                                                                          torch.linalg.svd(m)[2][0])
                              for m in fmap.flatten(2)]).reshape(fmap.shape)
        logits = F.linear(tiny.model.pool(edited.float()).double(), tiny.model.head.weight.double(),
                          tiny.model.head.bias.double())
    want = torch.logsumexp(logits, 1)
    torch.testing.assert_close(det.score_on(tiny.model, tiny.ood_set, device="cpu"), want, rtol=1e-5, atol=1e-5)
