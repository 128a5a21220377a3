"""The embedded default model (relfast/assets/shapes_vit.pt): it loads offline, classifies fresh
Shapes images, and its generic-method explanations sit on the objects, whose masks are known."""
import torch

import relfast
from relfast.data import make_shapes, normalize
from relfast.models import DEFAULT_CHECKPOINT, default_model


def object_patches(masks, patch=8):
    return torch.nn.functional.avg_pool2d(masks[:, None].float(), patch)[:, 0].flatten(1) > 0


def relevance_share_on_objects(maps, on_object):
    weights = maps.clamp(min=0).flatten(1)
    weights = weights / weights.sum(1, keepdim=True)
    return (weights * on_object).sum(1).mean().item()


def test_checkpoint_is_small_and_classifies_fresh_images():
    assert DEFAULT_CHECKPOINT.stat().st_size < 2 * 1024 * 1024
    model = default_model()
    images, labels, _ = make_shapes(300, seed=2024)  # the training set used seed 0
    with torch.no_grad():
        predicted = model(pixel_values=normalize(images)).logits.argmax(-1)
    assert (predicted == labels).float().mean().item() >= 0.98


def test_generic_explanations_point_at_the_objects():
    model = default_model()
    images, labels, masks = make_shapes(120, seed=7)
    on_object = object_patches(masks)
    out = relfast.Explainer(model)(normalize(images), target=labels)
    maps = out.image_map()
    top = maps.flatten(1).argmax(1)
    pointing = on_object.gather(1, top[:, None]).float().mean().item()
    assert pointing >= 0.8, pointing
    share = relevance_share_on_objects(maps, on_object)
    area = on_object.float().mean().item()
    assert share >= 1.6 * area, (share, area)
    # [P2]'s claim against the class-agnostic baseline: more of the relevance on the object.
    rollout = relfast.Explainer(model, "rollout")(normalize(images)).image_map()
    assert share > relevance_share_on_objects(rollout, on_object) + 0.1
