"""Shared test vocabulary: devices, dtypes with their tolerances, shapes, input builders."""
import itertools

import pytest
import torch

import relfast

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]

# Relative tolerance per dtype, applied against a float64 reference computed from the same
# (already rounded) inputs; `atol` is the same fraction of the result's largest magnitude, so
# near-zero entries of a sum are judged on the sum's scale. Half types are dominated by the
# rounding of the output (fp16 eps 2^-11, bf16 eps 2^-8); float32 by summation over N*H terms.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

CUDA_READY = torch.cuda.is_available() and relfast.ops.built_with_cuda()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_READY, reason="needs a GPU and a CUDA build"))]

# (B, H, N): every N in {1, 7, 197, 577}, B in {0, 1, 3}, H in {1, 12} appears, odd sizes mixed.
SHAPES = [(0, 12, 7), (1, 1, 1), (3, 12, 1), (1, 12, 7), (3, 1, 7), (3, 12, 197), (1, 1, 197), (1, 12, 577), (3, 1, 577)]
# A cheaper subset for the half types and non-contiguous variants of the O(N^3) ops.
SMALL_SHAPES = [(0, 12, 7), (1, 1, 1), (3, 12, 7), (1, 12, 197), (3, 1, 197)]


def shape_id(shape):
    return "B{}H{}N{}".format(*shape)


def cases(shapes=SHAPES, dtypes=DTYPES):
    """(device, dtype, shape, contiguous) parameters with readable ids."""
    params = []
    for device, dtype, shape, contiguous in itertools.product(DEVICES, dtypes, shapes, (True, False)):
        dev = device.values[0] if hasattr(device, "values") else device
        marks = device.marks if hasattr(device, "marks") else ()
        ident = f"{dev}-{str(dtype).split('.')[-1]}-{shape_id(shape)}-{'contig' if contiguous else 'strided'}"
        params.append(pytest.param(dev, dtype, shape, contiguous, id=ident, marks=marks))
    return params


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def attention(B, H, Nq, Nk, gen):
    """Softmax-normalised rows, like real attention probabilities (float64, CPU)."""
    return (2 * torch.randn(B, H, Nq, Nk, generator=gen, dtype=torch.float64)).softmax(dim=-1)


def gradient(B, H, Nq, Nk, gen):
    return torch.randn(B, H, Nq, Nk, generator=gen, dtype=torch.float64)


def relevance_map(B, N, M, gen, identity=True):
    """A relevance map as rule 6 builds it: identity plus small non-negative mass."""
    R = torch.rand(B, N, M, generator=gen, dtype=torch.float64) / max(M, 1)
    if identity:
        R = R + torch.eye(N, M, dtype=torch.float64)
    return R


def to_case(t, dtype, device, contiguous):
    """`t` rounded to `dtype` on `device`, optionally as a non-contiguous view (stride 2 in the
    last dimension) holding the same values."""
    t = t.to(device=device, dtype=dtype)
    if contiguous:
        return t
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=dtype, device=device)
    view = wide[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous() or view.numel() <= 1
    return view


def exact(*tensors):
    """float64 CPU copies of the (rounded) inputs: what the reference runs on."""
    return [t.detach().to("cpu", torch.float64) for t in tensors]


def assert_matches_reference(actual, expected, dtype, rtol=None):
    """`actual` (in `dtype`) equals the float64 `expected` within the dtype's tolerance (or `rtol`)."""
    assert actual.dtype == dtype, f"output dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"output shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    rtol = RTOL[dtype] if rtol is None else rtol
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.detach().to("cpu", torch.float64), expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


def seed_for(*params):
    """A fixed seed per parametrisation: fresh inputs for each case, reproducible runs."""
    import zlib

    return zlib.crc32(repr(params).encode())


def assert_batch_equals_per_sample(fn, batched_args, batch_size):
    """fn on the whole batch equals fn on each sample alone (batched args are sliced on dim 0)."""
    whole = fn(*batched_args)
    for b in range(batch_size):
        single = fn(*[a[b:b + 1] for a in batched_args])
        torch.testing.assert_close(whole[b:b + 1], single, rtol=1e-6, atol=1e-7)


def cli_in_process(capsys, *args):
    """``relfast.cli.main`` on ``args``, in this process: (exit code, stdout, stderr)."""
    import relfast.cli

    try:
        relfast.cli.main(list(args))
        code = 0
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
