"""Method 'attnlrp' against lxt 2.1, the AttnLRP authors' library (Achtibat et al., ICML 2024).

lxt patches transformers < 4.54, so it runs in its own environment: scripts/make_lxt_env.sh builds
it and runs scripts/lxt_reference.py there, which writes (to tests/lxt_reference/, small files)
tiny seeded float64 models of every family lxt's efficient AttnLRP patches (Llama, Qwen2, GPT-2,
BERT, torchvision ViT), a padded batch of 3 inputs each, and lxt's relevance of each sample alone,
unpadded, for its argmax logit. Here, in relfast's environment (transformers 5.x reads the 4.x
checkpoints), relfast explains the padded batch at once, with the model's SDPA and with eager
attention, and each sample must equal lxt's to 1e-4 of its largest |R| (measured: 4e-9 to 5e-8, which
is the float32 rounding of lxt's map: relfast returns float32 maps; rounded to float32, lxt's map
equals relfast's bit for bit here).

torchvision's ViT: lxt 2.1 has only CP-LRP inside nn.MultiheadAttention for it (no relevance
through the softmax); its reference keeps lxt's LayerNorm and GELU patches and puts AttnLRP's
attention rule (lxt's own ``divide_gradient``: q, k / 4, v / 2) in place of that one (see the
script). lxt's CP-LRP maps are kept too: relfast must differ from them by far more than the
tolerance, which shows the comparison can fail.

Without the reference files (another folder: RELFAST_LXT_REFERENCE) the tests are skipped.
"""
import json
import os
from pathlib import Path

import pytest
import torch

import relfast

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

REFERENCE = Path(os.environ.get("RELFAST_LXT_REFERENCE", Path(__file__).parent / "lxt_reference"))
FAMILIES = ["llama", "qwen2", "gpt2", "bert", "torchvision_vit"]
CAUSAL_LMS = {"llama", "qwen2", "gpt2"}
TOLERANCE = 1e-4  # of the sample's largest |R|


def reference_files(family, variant="attnlrp"):
    folder = REFERENCE / family
    files = [folder / "reference.pt", folder / f"lxt_{variant}.pt"]
    files.append(folder / ("torchvision.pt" if family == "torchvision_vit" else "model.safetensors"))
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        pytest.skip(f"lxt reference files absent ({', '.join(missing)}); write them with "
                    "`bash scripts/make_lxt_env.sh` (builds lxt 2.1's environment, needs PyPI once)")
    return folder


def load(family, attention="sdpa"):
    """(model float64 eval, reference dict, {variant: per-sample relevance})."""
    import transformers

    folder = reference_files(family)
    reference = torch.load(folder / "reference.pt", weights_only=True)
    lxt = {v: torch.load(folder / f"lxt_{v}.pt", weights_only=True)
           for v in ("attnlrp", "cp_lrp") if (folder / f"lxt_{v}.pt").exists()}
    if family == "torchvision_vit":
        from torchvision.models.vision_transformer import VisionTransformer

        with open(folder / "torchvision.json") as f:
            model = VisionTransformer(**json.load(f)).double()  # float64 before the weights go in
        model.load_state_dict(torch.load(folder / "torchvision.pt", weights_only=True), strict=True)
    else:
        auto = transformers.AutoModelForCausalLM if family in CAUSAL_LMS else \
            transformers.AutoModelForSequenceClassification
        model = auto.from_pretrained(folder, dtype=torch.float64, attn_implementation=attention)
        assert next(model.parameters()).dtype == torch.float64
    return model.eval(), reference, lxt


def explain(family, model, reference):
    inputs = reference["inputs"]
    inputs = inputs["pixels"] if family == "torchvision_vit" else dict(inputs)
    return relfast.Explainer(model, "attnlrp")(inputs, target=reference["targets"])


def per_sample(family, out, reference, b):
    """relfast's relevance of sample b where lxt has it: its real tokens; images, the patches."""
    if family == "torchvision_vit":
        assert out.relevance[b, 0] == 0  # the class token, a parameter
        return out.relevance[b, 1:].double()
    mask = reference["inputs"]["attention_mask"][b].bool()
    assert (out.relevance[b, ~mask] == 0).all()  # padding
    return out.relevance[b, mask].double()


def relative_errors(family, out, reference, lxt):
    return [float((per_sample(family, out, reference, b) - want).abs().max() / want.abs().max())
            for b, want in enumerate(lxt)]


# Eager attention for GPT-2 and BERT only: HF's eager Llama/Qwen2 take the float64 mask's finfo.min
# to float32 for their softmax, where it is -inf; a left-padded sample's padding rows (all masked)
# are then NaN, and spread to every token, in the model's own forward (relfast refuses those scores).
CASES = [(f, "sdpa") for f in FAMILIES if f != "torchvision_vit"] + [("gpt2", "eager"), ("bert", "eager"),
                                                                     ("torchvision_vit", "mha")]


@pytest.mark.parametrize("family,attention", CASES)
def test_batched_padded_equals_lxt_per_sample(family, attention):
    model, reference, lxt = load(family, "sdpa" if attention == "mha" else attention)
    out = explain(family, model, reference)
    batch = len(lxt["attnlrp"])
    assert batch >= 3 and out.target.tolist() == reference["targets"].tolist()
    # the weights really loaded: relfast's batched forward gives the logits lxt's side computed
    torch.testing.assert_close(out.logits.double(), reference["logits"], rtol=1e-7, atol=1e-9)
    assert out.target.tolist() == reference["logits"].argmax(-1).tolist()
    errors = relative_errors(family, out, reference, lxt["attnlrp"])
    print(f"\n{family} ({attention}): max |relfast - lxt| / max |lxt| per sample: "
          + ", ".join(f"{e:.1e}" for e in errors))
    for b, want in enumerate(lxt["attnlrp"]):
        assert want.shape == per_sample(family, out, reference, b).shape
        assert float(want.abs().max()) > 1e-3  # a map, not zeros
    assert max(errors) <= TOLERANCE, errors


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "torchvision_vit"])
def test_the_comparison_tells_attnlrp_from_cp_lrp(family):
    """lxt's CP-LRP (the same rules, but no relevance through the softmax) is far from relfast's
    AttnLRP on these models, so the tolerance above separates the two (measured: 0.2 to 1.5)."""
    reference_files(family, "cp_lrp")
    model, reference, lxt = load(family)
    out = explain(family, model, reference)
    errors = relative_errors(family, out, reference, lxt["cp_lrp"])
    print(f"\n{family}: max |relfast - lxt CP-LRP| / max |lxt CP-LRP| per sample: "
          + ", ".join(f"{e:.1e}" for e in errors))
    assert min(errors) > 100 * TOLERANCE, errors
