"""Absorbed MLA decode: Triton kernel and the PyTorch GEMM path vs the fp32 reference vs a naive softmax loop.

On CPU tensors the launcher runs the kernel through the Triton interpreter (no TRITON_INTERPRET
needed, whatever imported Triton first); fp32 and fp16 only there, since the interpreter gets
tl.dot on bf16 wrong. On a GPU the same cases run compiled, in bf16 as well.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xecomla_cli.kernels import ENV_VAR, decode_backend, mla_decode_auto
from xecomla_cli.kernels.reference import mla_decode_reference
from xecomla_cli.kernels.torch_decode import mla_decode_torch

triton = pytest.importorskip("triton")
from xecomla_cli.kernels.mla_decode import default_num_splits, mla_decode  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"cpu": [torch.float32, torch.float16], "cuda": [torch.bfloat16, torch.float16, torch.float32]}
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
BLOCK_SIZE = 16  # rows per page of the paged cache


def make_case(B, H, r, p, L, dtype, device, paged, seed=0, masked=False):
    """Random queries, cache and lengths (one sequence of length 1, one full); paged layout if asked.

    masked: a padding mask too, hiding a random prefix of each sequence but its last position, and a
    stretch in the middle of the longest one (so whole tiles and splits see nothing)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, r + p, generator=g)
    q_lat, q_rope = q[..., :r], q[..., r:]  # views with row stride r + p, as the model's split gives
    kv = torch.randn(B, L, r, generator=g)
    k_rope = torch.randn(B, L, p, generator=g)
    seq_lens = torch.randint(1, L + 1, (B,), generator=g, dtype=torch.int32)
    seq_lens[0] = 1
    seq_lens[-1] = L
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    args = dict(
        q_lat=cast(q_lat),
        q_rope=cast(q_rope),
        kv=cast(kv),
        k_rope=cast(k_rope),
        seq_lens=seq_lens.to(device),
        sm_scale=1.0 / math.sqrt(r + p),
    )
    if masked:  # drawn before the pages, so that paged and contiguous cases get the same mask
        args["mask"] = padding_mask(seq_lens, L, g).to(device)
    if paged:
        args.update(paginate(args["kv"], args["k_rope"], seq_lens, g))
    return args


def padding_mask(seq_lens, L, g):
    """[B, >= paged capacity] bool: left padding of random length (the last position stays visible), a hole
    in the last row."""
    mask = torch.ones(len(seq_lens), -(-L // BLOCK_SIZE) * BLOCK_SIZE + 3, dtype=torch.bool)
    for b, n in enumerate(seq_lens.tolist()):
        mask[b, : int(torch.randint(0, n, (1,), generator=g))] = False
    mask[-1, L // 4 : L // 2] = False
    return mask


def paginate(kv, k_rope, seq_lens, g):
    """Scatter a contiguous cache into shuffled pages; table entries past a sequence's end are -1."""
    B, L, _ = kv.shape
    max_blocks = -(-L // BLOCK_SIZE)
    num_blocks = B * max_blocks + 3  # a few spare pages nobody owns
    perm = torch.randperm(num_blocks, generator=g)[: B * max_blocks].view(B, max_blocks)
    pad = max_blocks * BLOCK_SIZE - L
    kv_pages = torch.randn(num_blocks, BLOCK_SIZE, kv.shape[-1], generator=g).to(kv)
    kr_pages = torch.randn(num_blocks, BLOCK_SIZE, k_rope.shape[-1], generator=g).to(k_rope)
    kv_pages[perm.flatten()] = torch.nn.functional.pad(kv, (0, 0, 0, pad)).view(-1, BLOCK_SIZE, kv.shape[-1])
    kr_pages[perm.flatten()] = torch.nn.functional.pad(k_rope, (0, 0, 0, pad)).view(-1, BLOCK_SIZE, k_rope.shape[-1])
    used = torch.arange(max_blocks)[None, :] * BLOCK_SIZE < seq_lens[:, None]
    block_table = torch.where(used, perm, -1).to(device=kv.device, dtype=torch.int32)
    return dict(kv=kv_pages, k_rope=kr_pages, block_table=block_table)


def naive_decode(q_lat, q_rope, kv, k_rope, seq_lens, sm_scale, mask=None):
    """One sequence and one head at a time, fp64, contiguous cache: out [B, H, r], lse [B, H]."""
    B, H, r = q_lat.shape
    out = torch.zeros(B, H, r, dtype=torch.float64)
    lse = torch.zeros(B, H, dtype=torch.float64)
    for b in range(B):
        n = int(seq_lens[b])
        seen = torch.arange(n) if mask is None else torch.nonzero(mask[b, :n]).flatten()
        keys_lat, keys_rope = kv[b, seen].double(), k_rope[b, seen].double()
        for h in range(H):
            s = sm_scale * (keys_lat @ q_lat[b, h].double() + keys_rope @ q_rope[b, h].double())  # [n]
            out[b, h] = torch.softmax(s, dim=0) @ keys_lat
            lse[b, h] = torch.logsumexp(s, dim=0)
    return out, lse


@pytest.mark.parametrize("masked", [False, True], ids=["lengths", "masked"])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("H,r,p", [(9, 64, 32), (1, 48, 16), (16, 72, 8)])
def test_reference_matches_naive_loop(H, r, p, paged, masked):
    contiguous = make_case(3, H, r, p, 37, torch.float32, "cpu", paged=False, seed=1, masked=masked)
    args = make_case(3, H, r, p, 37, torch.float32, "cpu", paged=paged, seed=1, masked=masked)
    out, lse = mla_decode_reference(**args, return_lse=True)
    want_out, want_lse = naive_decode(**contiguous)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["lengths", "masked"])
@pytest.mark.parametrize("paged", [False, True])
def test_torch_path_matches_reference(paged, masked):
    args = make_case(4, 9, 64, 32, 50, torch.float32, "cpu", paged=paged, seed=2, masked=masked)
    out, lse = mla_decode_torch(**args, return_lse=True)
    want_out, want_lse = mla_decode_reference(**args, return_lse=True)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_torch_path_reads_strided_rows_of_a_larger_buffer():
    """The growing cache hands over views (batch stride = capacity); no lengths, no mask."""
    args = make_case(3, 9, 64, 32, 40, torch.float32, "cpu", paged=False, seed=6)
    buffer_kv, buffer_kr = torch.randn(3, 64, 64), torch.randn(3, 64, 32)
    buffer_kv[:, :40], buffer_kr[:, :40] = args["kv"], args["k_rope"]
    full = dict(args, seq_lens=torch.full((3,), 40, dtype=torch.int32))
    views = dict(args, kv=buffer_kv[:, :40], k_rope=buffer_kr[:, :40], seq_lens=None)
    torch.testing.assert_close(mla_decode_torch(**views), mla_decode_reference(**full), atol=1e-5, rtol=1e-5)


KERNEL_CASES = [
    # (B, H, r, p, L, num_splits): L long enough for several BLOCK_N tiles per split
    (3, 9, 64, 32, 80, 1),
    (3, 9, 64, 32, 200, 3),
    (2, 1, 48, 16, 70, 1),
    (2, 1, 48, 16, 300, 4),  # all but one split of the length-1 sequence are empty
    (2, 16, 72, 8, 150, 2),
    (2, 32, 128, 32, 64, None),  # heuristic split count
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("B,H,r,p,L,num_splits", KERNEL_CASES)
def test_kernel_matches_reference(B, H, r, p, L, num_splits, paged, device):
    for dtype in DTYPES[device]:
        args = make_case(B, H, r, p, L, dtype, device, paged, seed=B * H + L, masked=L in (200, 300))
        out, lse = mla_decode(**args, num_splits=num_splits, return_lse=True)
        want_out, want_lse = mla_decode_reference(**args, return_lse=True)
        assert out.shape == (B, H, r) and out.dtype == dtype and lse.shape == (B, H)
        atol = ATOL[dtype]
        torch.testing.assert_close(
            out.float(), want_out.float(), atol=atol, rtol=atol, msg=lambda m, dtype=dtype: f"{dtype}: {m}"
        )
        torch.testing.assert_close(lse, want_lse, atol=atol, rtol=atol, msg=lambda m, dtype=dtype: f"{dtype} lse: {m}")


def test_kernel_on_views_of_one_cache_buffer():
    """kv and k_rope as views of one [B, L, r + p] buffer (strides r + p) give the same result."""
    args = make_case(2, 9, 64, 32, 100, torch.float32, DEVICES[-1], paged=False, seed=5)
    buffer = torch.cat([args["kv"], args["k_rope"]], dim=-1)
    views = dict(args, kv=buffer[..., :64], k_rope=buffer[..., 64:])
    torch.testing.assert_close(mla_decode(**views, num_splits=2), mla_decode_reference(**args), atol=1e-5, rtol=1e-5)


def test_kernel_rejects_bad_inputs():
    args = make_case(2, 9, 64, 32, 20, torch.float32, "cpu", paged=False)
    with pytest.raises(ValueError, match="share a dtype"):
        mla_decode(**dict(args, kv=args["kv"].half()))
    with pytest.raises(ValueError, match="k_rope"):
        mla_decode(**dict(args, k_rope=args["k_rope"][..., :16]))
    with pytest.raises(ValueError, match="seq_lens"):
        mla_decode(**dict(args, seq_lens=args["seq_lens"][:1]))


def test_kernel_detects_a_wrong_length():
    """The comparison has teeth: attending to one row too many changes the answer."""
    args = make_case(2, 9, 64, 32, 40, torch.float32, DEVICES[-1], paged=False, seed=3)
    args["seq_lens"] = torch.tensor([20, 39], dtype=torch.int32, device=args["kv"].device)
    out = mla_decode(**args, num_splits=2)
    longer = dict(args, seq_lens=args["seq_lens"] + 1)
    assert (out.float() - mla_decode_reference(**longer).float()).abs().max() > 1e-3
    torch.testing.assert_close(out, mla_decode_reference(**args), atol=1e-5, rtol=1e-5)


def test_num_splits_heuristic():
    # batch 1 fills the GPU by splitting; a big batch barely splits; never more splits than rows allow
    assert default_num_splits(1, 32, 8192, num_sms=132) >= 16
    assert default_num_splits(64, 32, 8192, num_sms=132) <= 8
    assert default_num_splits(1, 32, 100, num_sms=132) == 1
    assert 1 <= default_num_splits(512, 128, 1 << 20, num_sms=132) <= 64


def test_dispatcher_env_switch(monkeypatch):
    args = make_case(2, 9, 64, 32, 30, torch.float32, "cpu", paged=True, seed=4)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert decode_backend(torch.device("cpu")) == "torch"  # the default off CUDA: two batched GEMMs
    torch.testing.assert_close(mla_decode_auto(**args), mla_decode_torch(**args), atol=0, rtol=0)
    monkeypatch.setenv(ENV_VAR, "reference")
    assert decode_backend(torch.device("cpu")) == "reference"
    torch.testing.assert_close(mla_decode_auto(**args), mla_decode_reference(**args), atol=0, rtol=0)
    monkeypatch.setenv(ENV_VAR, "triton")  # forced: the interpreter runs the kernel on CPU
    assert decode_backend(torch.device("cpu")) == "triton"
    out, lse = mla_decode_auto(**args, return_lse=True)
    want_out, want_lse = mla_decode_reference(**args, return_lse=True)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv(ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match=ENV_VAR):
        mla_decode_auto(**args)


def test_kernel_is_one_opaque_op_for_torch_compile():
    """Under torch.compile the launch is the custom op xecomla::mla_decode: schema, fake tensor and eager agree."""
    args = make_case(2, 9, 64, 32, 40, torch.float32, "cpu", paged=False, seed=8, masked=True)
    op_args = (args["q_lat"], args["q_rope"], args["kv"], args["k_rope"], args["seq_lens"], args["mask"], None)
    torch.library.opcheck(
        torch.ops.xecomla.mla_decode.default,
        (*op_args, args["sm_scale"], 2),
        test_utils=("test_schema", "test_faketensor"),
    )
    compiled = torch.compile(lambda **a: mla_decode(**a, num_splits=2), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(**args), mla_decode_reference(**args), atol=1e-5, rtol=1e-5)


def test_kernel_compiles_for_h100_without_a_gpu():
    """The real compiler (not the interpreter) lowers it to tensor-core code that fits in registers."""
    root = Path(__file__).resolve().parents[1]
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton build ships no ptxas")
    code = (
        "import json, torch; from xecomla_cli.kernels.compile_check import compile_for_gpu as c; "
        "print(json.dumps([c(90), c(90, paged=True), c(90, masked=True), c(90, torch.float16, 72, 8, H=9), "
        "c(80, torch.bfloat16, 48, 16, H=1, paged=True)]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=300,
        env={**env, "PYTHONPATH": str(root)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for report in json.loads(res.stdout):
        assert report["tensor_cores"] in ("mma", "wgmma") and report["cp_async"], report
        assert report["shared_bytes"] <= 100 * 1024 and report.get("local_bytes", 0) == 0, report


def test_gpu_check_tiny_runs_every_part(tmp_path):
    """bench/gpu_check.py --tiny: the kernel benchmark (--quick), the end-to-end decode (--tiny) and the
    distillation throughput (--quick) each print one JSON object with their ratios filled in."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_check.json"
    res = subprocess.run(
        [sys.executable, str(root / "bench" / "gpu_check.py"), "--tiny", "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    parts = json.loads(out.read_text())["parts"]
    assert all("result" in part for part in parts.values()), {k: v.get("stderr_tail") for k, v in parts.items()}
    kernel = parts["decode_kernel"]["result"]
    assert kernel["shapes"] and all(s["max_abs_err"] < 0.05 and s["speedup_vs_sdpa"] > 0 for s in kernel["shapes"])
    (point,) = parts["decode_e2e"]["result"]["points"]
    assert point["tokens_match"] and point["speedup_vs_original"] > 0 and point["roofline_speedup"] > 1
    assert point["mla_cache_bytes_per_token"] == 2 * (16 + 8) * 4  # 2 layers x (r + p) fp32 values
    assert "error" not in point["mla_static"], point["mla_static"]  # the decode step traces as one graph
    assert parts["distill"]["result"]["results"][0]["tokens_per_s"] > 0
