"""Input limits shared by the eager explainer and the ONNX runtime, so that both refuse the same inputs.

Plain numbers only: the runtime imports this module without torch.
"""

# Float model inputs (pixels, embeddings) are of order 1 once normalised. Far beyond that, float32
# arithmetic inside the model overflows: eager LayerNorm turns it into NaN (refused), while ONNX
# Runtime's fused LayerNorm returns finite but wrong maps (both seen from 1e20 on the demo ViT).
# One bound, far below either failure, makes the two entry points agree on every input.
MAX_ABS_FLOAT_INPUT = 1e6
