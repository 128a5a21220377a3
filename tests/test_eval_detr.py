"""[P2] Algorithm 1 (relfast.eval.detr_masks) on hand-made relevance maps with known blobs: the
masks are the blobs, grown exactly as bilinear upsampling followed by sigmoid > 0.5 grows them;
queries below the class-probability threshold get empty masks; bad arguments are refused."""
import pytest
import torch

from relfast.eval import detr_masks

CONFIDENT, UNSURE = [6.0, 0.0, -2.0], [0.0, 0.2, 0.1]  # (2 real classes + "no object") logits


def blob_map(rows, cols, size=8, noise=0.05, seed=0):
    """Low background noise, a block of high relevance."""
    g = torch.Generator().manual_seed(seed)
    relevance = noise * torch.rand(size, size, generator=g)
    relevance[rows[0]:rows[1], cols[0]:cols[1]] += 1.0
    return relevance


def block(size, rows, cols):
    mask = torch.zeros(size, dtype=torch.bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def test_a_confident_query_gets_its_blob_upsampled_by_nearest_neighbour():
    relevance = blob_map((2, 5), (3, 6))[None, None]
    masks = detr_masks(relevance, torch.tensor([[CONFIDENT]]), mask_size=(8, 8), image_size=(32, 32))
    assert masks.shape == (1, 1, 1, 32, 32) and masks.dtype == torch.bool
    assert torch.equal(masks[0, 0, 0], block((32, 32), (8, 20), (12, 24)))  # each map pixel a 4x4 block


def test_bilinear_upsampling_then_sigmoid_grows_the_blob_by_the_half_pixel_it_touches():
    """8 -> 16 bilinear (align_corners=False): output row y samples the map at y/2 - 1/4, so the
    blob's rows 2..4 reach output rows 3..10 and its columns 3..5 output columns 5..12; sigmoid > 0.5
    keeps every pixel above 0; nearest 16 -> 32 doubles them."""
    relevance = blob_map((2, 5), (3, 6))[None, None]
    masks = detr_masks(relevance, torch.tensor([[CONFIDENT]]), mask_size=(16, 16), image_size=(32, 32))
    assert torch.equal(masks[0, 0, 0], block((32, 32), (6, 22), (10, 26)))


def test_queries_below_the_threshold_and_flat_maps_get_empty_masks():
    relevance = torch.stack([blob_map((0, 3), (0, 3)), blob_map((4, 8), (4, 8)), torch.full((8, 8), 0.3)])
    logits = torch.tensor([CONFIDENT, UNSURE, CONFIDENT])  # the "no object" column never counts
    masks = detr_masks(relevance, logits, mask_size=(8, 8), image_size=(16, 16))  # one image, (Q, h, w)
    assert masks.shape == (3, 1, 16, 16)
    assert torch.equal(masks[0, 0], block((16, 16), (0, 6), (0, 6)))
    assert not masks[1].any() and not masks[2].any()


def test_no_object_is_not_a_class():
    logits = torch.tensor([[[0.0, 0.0, 8.0]]])  # almost surely "no object"
    assert not detr_masks(blob_map((1, 4), (1, 4))[None, None], logits, (8, 8), (8, 8)).any()


def test_images_of_a_batch_are_independent():
    relevance = torch.stack([torch.stack([blob_map((0, 2), (0, 2)), blob_map((5, 8), (5, 8))]),
                             torch.stack([blob_map((3, 6), (3, 6)), blob_map((0, 8), (0, 1))])])
    logits = torch.tensor([[CONFIDENT, CONFIDENT], [UNSURE, CONFIDENT]])
    masks = detr_masks(relevance, logits, (8, 8), (8, 8))
    for b in range(2):
        alone = detr_masks(relevance[b], logits[b], (8, 8), (8, 8))
        assert torch.equal(masks[b], alone)
    assert not masks[1, 0].any() and torch.equal(masks[1, 1, 0], block((8, 8), (0, 8), (0, 1)))


BAD = {
    "relevance rank": (lambda: detr_masks(torch.zeros(8, 8), torch.zeros(1, 3), (8, 8), (8, 8)), "'relevance'"),
    "logits queries": (lambda: detr_masks(torch.zeros(1, 2, 8, 8), torch.zeros(1, 3, 3), (8, 8), (8, 8)), "'logits'"),
    "no real class": (lambda: detr_masks(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 1), (8, 8), (8, 8)),
                      "at least one real class"),
    "mask size": (lambda: detr_masks(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 3), (8, 0), (8, 8)), "'mask_size'"),
    "image size": (lambda: detr_masks(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 3), (8, 8), 8), "'image_size'"),
    "NaN": (lambda: detr_masks(torch.full((1, 1, 8, 8), float("nan")), torch.zeros(1, 1, 3), (8, 8), (8, 8)),
            "must be finite"),
    "threshold": (lambda: detr_masks(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 3), (8, 8), (8, 8), threshold=1.5),
                  "'threshold'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_are_named(case):
    call, words = BAD[case]
    with pytest.raises(ValueError, match="relfast.eval.detr_masks: .*" + words):
        call()


def test_numpy_and_tensor_thresholds_and_sizes_are_numbers():
    import numpy as np

    relevance = torch.stack([blob_map((0, 3), (0, 3)), blob_map((4, 8), (4, 8))])
    logits = torch.tensor([CONFIDENT, [0.0, 1.0, 0.0]])  # the second query's best class: p ~ 0.58
    plain = detr_masks(relevance, logits, (8, 8), (16, 16), threshold=0.6)
    assert plain[0].any() and not plain[1].any()
    for threshold in (np.float32(0.6), torch.tensor(0.6)):
        assert torch.equal(detr_masks(relevance, logits, (np.int64(8), 8), (16, np.int32(16)), threshold=threshold),
                           plain)
