"""The CUDA layouts of the quantized modules: the repacking math on any machine, the kernels on a GPU.

The pure-torch copy of torch's CUDA int4 packer (`cuda_layout.tinygemm_layout`) is
checked here against a line-by-line reading of the kernel's index arithmetic and
against the stored format's meaning; on a GPU, against torch's packer itself.
"""

import pytest
import torch
from torch import nn

from slimkit.quantization import cuda_layout as C
from slimkit.quantization import formats as F
from slimkit.quantization.cuda_layout import int8_weight_matmul
from slimkit.quantization.embedding import Int8Embedding
from slimkit.quantization.modules import StaticInt8Linear, WeightOnlyLinear

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: the int4 tinygemm and int8 weight kernels run only there")


def _codes(n, k, seed=0):
    return torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _high_first(codes):  # (N, K) codes -> (N, K // 2) bytes, element 2i in the high nibble
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


def _layout_by_loops(packed: torch.Tensor, tiles: int) -> torch.Tensor:
    """The CUDA packer's loops, one lane at a time, as its source reads (NVIDIA branch)."""
    n, half_k = packed.shape
    out = torch.zeros(n // 8, half_k * 2 // (tiles * 16), 32, tiles // 2, dtype=torch.int64)
    for n_tile in range(out.shape[0]):
        for k_outer in range(out.shape[1]):
            for t in range(32):
                for inner in range(0, tiles, 2):
                    row = n_tile * 8 + t // 4
                    base = (k_outer * tiles + inner) * 16 // 2
                    ks = [base + t % 4, base + t % 4 + 4, base + 8 + t % 4, base + 8 + t % 4 + 4]
                    v = [int(packed[row, j]) for j in ks]
                    word = ((v[3] & 0xF) << 28) | ((v[2] & 0xF) << 24) | ((v[1] & 0xF) << 20) | ((v[0] & 0xF) << 16) \
                        | ((v[3] & 0xF0) << 8) | ((v[2] & 0xF0) << 4) | (v[1] & 0xF0) | ((v[0] & 0xF0) >> 4)
                    out[n_tile, k_outer, t, inner // 2] = word
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


@pytest.mark.parametrize("n,k,tiles", [(8, 32, 2), (16, 64, 4), (16, 128, 8), (24, 128, 2)])
def test_tinygemm_layout_follows_the_kernels_index_arithmetic(n, k, tiles):
    packed = _high_first(_codes(n, k))
    assert torch.equal(C.tinygemm_layout(packed, tiles), _layout_by_loops(packed, tiles))


@pytest.mark.parametrize("tiles", [2, 4, 8])
def test_tinygemm_codes_invert_the_layout(tiles):
    codes = _codes(40, 256, seed=tiles)
    layout = C.tinygemm_layout(_high_first(codes), tiles)
    assert layout.shape == (5, 256 // (16 * tiles), 32, tiles // 2) and layout.dtype == torch.int32
    assert torch.equal(C.tinygemm_codes(layout), codes)


def test_high_nibble_first_swaps_our_packing():
    codes = _codes(8, 64)
    assert torch.equal(C.high_nibble_first(F.pack_int4(codes)), _high_first(codes))


def test_inner_k_tiles_and_support():
    assert [C.inner_k_tiles(k) for k in (32, 64, 96, 128, 576, 48)] == [2, 4, 2, 8, 4, None]
    assert C.tinygemm_supported(64, 256, 64) and C.tinygemm_supported(576, 576, 32)
    assert not C.tinygemm_supported(60, 256, 64)  # N not a multiple of 8
    assert not C.tinygemm_supported(64, 256, None) and not C.tinygemm_supported(64, 256, 16)
    with pytest.raises(ValueError, match="N % 8"):
        C.tinygemm_layout(torch.zeros(12, 16, dtype=torch.uint8), 2)


@pytest.mark.parametrize("sym,zero_point", [(True, "float"), (False, "float"), (False, "integer")])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_cuda_layout_means_what_the_module_stores(sym, zero_point, group):
    """Codes read back from the CUDA layout, times the shared scales and zeros, as the kernel
    computes them ((u - 8) * scale + zero), are the module's dequantized weight."""
    torch.manual_seed(0)
    q = WeightOnlyLinear.from_float(nn.Linear(256, 48, bias=False), bits=4, group_size=group, symmetric=sym, zero_point=zero_point)
    tiles = C.inner_k_tiles(q.in_features)
    u = C.tinygemm_codes(C.tinygemm_layout(C.high_nibble_first(q.qweight), tiles)).float()  # (N, K)
    sz = C.scales_and_zeros(q.scale, q.offset, q.zero_point)  # (G, N, 2)
    scale = sz[..., 0].T.repeat_interleave(group, dim=1)  # (N, K)
    zero = sz[..., 1].T.repeat_interleave(group, dim=1)
    torch.testing.assert_close((u - 8) * scale + zero, q.dequantize(), rtol=1e-6, atol=1e-6)


def test_kernel_choice_per_device():
    torch.manual_seed(0)
    int8 = WeightOnlyLinear.from_float(nn.Linear(64, 32), bits=8)
    grouped8 = WeightOnlyLinear.from_float(nn.Linear(64, 32), bits=8, group_size=32)
    per_channel4 = WeightOnlyLinear.from_float(nn.Linear(64, 32), bits=4)
    assert (int8.kernel(), int8.kernel("cuda"), int8.kernel("meta")) == ("int8pack", "int8pack-cuda", "dequantize")
    assert grouped8.kernel("cuda") == "dequantize" and per_channel4.kernel("cuda") == "dequantize"


@pytest.mark.parametrize("rows", [1, 4, 9])
def test_int8_weight_matmul_is_the_scaled_product(rows):
    """Both branches (the int8 kernel for few rows, a cast matmul for more) compute x @ (q * s).T."""
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (48, 64), dtype=torch.int8)
    s = torch.rand(48) / 100
    x = torch.randn(rows, 64)
    expected = x @ (q.float() * s[:, None]).T
    assert F.sqnr_db(expected, int8_weight_matmul(x, q, s).float()) > 35


def test_moving_a_module_drops_what_its_kernels_cached():
    """A layout built for one device never reaches a forward on another: every move clears it."""
    torch.manual_seed(0)
    q = WeightOnlyLinear.from_float(nn.Linear(128, 64), bits=4, group_size=32)
    x = torch.randn(3, 128)
    before = q(x)
    assert "w" in q._kernel
    saved = {k: v.clone() for k, v in q.state_dict().items()}
    q.to("cpu")
    assert q._kernel == {}
    assert torch.equal(q(x), before)
    assert all(torch.equal(saved[k], v) for k, v in q.state_dict().items())  # the saved layout never changes

    static = StaticInt8Linear.from_float(nn.Linear(128, 64))
    static(x)
    assert static._kernel
    static.to("meta")
    assert static._kernel == {}

    emb = Int8Embedding.from_float(nn.Embedding(32, 16))
    emb.head_matmul(torch.randn(2, 16))
    assert emb._kernel
    emb.to("cpu")
    assert emb._kernel == {}


# --------------------------------------------------------------------------- on a GPU


@needs_cuda
@pytest.mark.parametrize("tiles", [2, 4, 8])
def test_torch_cuda_packer_matches_the_reference(tiles):
    codes = _codes(64, 256, seed=tiles)
    packed = _high_first(codes)
    ours = C.tinygemm_layout(packed, tiles)
    torch_packed = torch.ops.aten._convert_weight_to_int4pack(packed.cuda(), tiles).cpu()
    assert torch.equal(torch_packed, ours)


@needs_cuda
@pytest.mark.parametrize("bits,group,sym,zero_point", [(8, None, True, "float"), (4, 32, True, "float"), (4, 64, False, "float"),
                                                       (4, 128, False, "integer")])
@pytest.mark.parametrize("rows", [1, 33])
def test_cuda_kernels_compute_the_stored_weight(bits, group, sym, zero_point, rows):
    torch.manual_seed(0)
    q = WeightOnlyLinear.from_float(nn.Linear(256, 64), bits=bits, group_size=group, symmetric=sym, zero_point=zero_point)
    x = torch.randn(rows, 256)
    expected = x @ q.dequantize().T + q.bias
    saved = {k: v.clone() for k, v in q.state_dict().items()}
    q.cuda()
    assert q.kernel(q.qweight.device) == ("int8pack-cuda" if bits == 8 else "int4-tinygemm")
    assert ("cuda_s" if bits == 8 else "cuda_w") in q._kernel  # built when it moved, not in the first forward
    out = q(x.cuda()).cpu()
    assert F.sqnr_db(expected, out) > 35
    assert all(torch.equal(saved[k], v.cpu()) for k, v in q.state_dict().items())  # the CPU layout is what saves
    q.cpu()
    assert F.sqnr_db(expected, q(x)) > 35


@needs_cuda
def test_cuda_int8_head_and_static_int8_after_a_cpu_forward():
    torch.manual_seed(0)
    emb = Int8Embedding.from_float(nn.Embedding(256, 64))
    x = torch.randn(5, 64)
    cpu = emb.head_matmul(x).float()
    emb.cuda()
    assert F.sqnr_db(cpu, emb.head_matmul(x.cuda()).float().cpu()) > 35
    static = StaticInt8Linear.from_float(nn.Linear(64, 32))
    static.set_input_qparams(torch.tensor(0.05), torch.tensor(0, dtype=torch.int32))
    on_cpu = static(x)
    static.cuda()  # the cached output scale moves with it
    assert F.sqnr_db(on_cpu, static(x.cuda()).cpu()) > 35
