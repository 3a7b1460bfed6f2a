"""Distributed quantization (`pipeline.distributed`, docs/scale.md): two gloo ranks on the built-in tiny-llama
agree with each other bit for bit and with one process up to the float order of the reductions."""

import os
import socket
import time

import pytest
import torch
from regression_cases import CASES

import flexquant as fq
from flexquant.nn import QuantLinear
from flexquant.pipeline.distributed import SINGLE, Dist

DIST_CASES = ("gptq", "flexible-3.5", "gptq-chunked")
CHUNK_BYTES = 100 * 3 * 256 * 4  # tiny-llama's MLP (d_ff 256) run 100 rows at a time: 3 chunks per 4 × 64 batch


def _quantize(name: str):
    """A regression case; "-chunked": with the MLP run in row chunks (`pipeline.prenorm.mlp_chunks`)."""
    from flexquant.pipeline import prenorm

    base = name.removesuffix("-chunked")
    saved = prenorm.MLP_CHUNK_BYTES
    prenorm.MLP_CHUNK_BYTES = CHUNK_BYTES if base != name else saved
    try:
        return fq.quantize("tiny-llama", progress=False, **CASES[base])
    finally:
        prenorm.MLP_CHUNK_BYTES = saved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _codes(model) -> dict[str, torch.Tensor]:
    """Every packed layer's codes in the original column order."""
    return {n: m.input_order_codes() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _worker(rank: int, world: int, port: int, folder: str, cases: tuple[str, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = {}
    for name in cases:
        t0 = time.perf_counter()
        qm = _quantize(name)
        out[name] = {"state": qm.model.state_dict(), "report": qm.report, "seconds": time.perf_counter() - t0}
        if rank == 0:
            fq.save(qm, os.path.join(folder, name), plot=False)
    torch.save(out, os.path.join(folder, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def run_ranks(world: int, folder, cases=DIST_CASES) -> list[dict]:
    """Run ``cases`` on ``world`` gloo ranks (spawned processes); each rank's {case: state, report, seconds}."""
    torch.multiprocessing.spawn(_worker, args=(world, _free_port(), str(folder), cases), nprocs=world)
    return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def kl_next_token(model, ref, windows: torch.Tensor) -> float:
    """Mean over tokens of KL(ref ‖ model) of the next-token distributions."""
    with torch.no_grad():
        p = torch.log_softmax(ref(windows).logits.float(), -1)
        q = torch.log_softmax(model(windows).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    ranks = run_ranks(2, folder)
    ranks[0]["folder"] = folder
    return ranks


@pytest.mark.parametrize("name", DIST_CASES)
def test_two_ranks_match_one_process(two_ranks, name):
    rank0, rank1 = (r[name] for r in two_ranks)
    # every rank ends with the same model; only rank 0 wrote a checkpoint
    assert sorted(p.name for p in two_ranks[0]["folder"].iterdir()) == sorted([*DIST_CASES, "rank0.pt", "rank1.pt"])
    assert rank0["state"].keys() == rank1["state"].keys()
    assert all(torch.equal(rank0["state"][k], rank1["state"][k]) for k in rank0["state"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same BLAS blocking, so the same float order
    try:
        single = _quantize(name)
    finally:
        torch.set_num_threads(threads)
    dist_model = fq.load(two_ranks[0]["folder"] / name).model
    a, b = _codes(single.model), _codes(dist_model)
    same = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].numel() for k in a)
    windows = torch.randint(0, single.model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))
    kl = kl_next_token(dist_model.eval(), single.model.eval(), windows)
    print(f"{name}: identical codes {same:.6f}, KL {kl:.3g}")
    assert same > 0.99 and kl <= 1e-5
    facts = rank0["report"]["distributed"]
    assert facts["world"] == 2 and facts["allreduce_bytes_total"] > 0
    assert all(n["allreduce_bytes"] > 0 and n["broadcast_bytes"] > 0 for n in rank0["report"]["blocks"])


def test_single_process_is_the_identity():
    assert SINGLE.shard(torch.arange(6).view(3, 2), 2).tolist() == [[0, 1], [2, 3], [4, 5]]
    x = torch.randn(5, 3)
    assert SINGLE.all_reduce_mean_weighted([x], 5)[0] is x and SINGLE.gather_batches([x])[0] is x
    assert SINGLE.owner(3) == 0 and SINGLE.local_windows(10, 4, 7) == 7


def test_round_robin_shards_keep_prefixes():
    ids = torch.arange(10).view(10, 1)
    r1 = Dist(rank=1, world=2)
    assert r1.shard(ids, 3).flatten().tolist() == [3, 4, 5, 9]
    # rank 1's share of the first 5 windows (batches 0 whole, 1 in part) is a prefix of its share of all windows
    assert r1.local_windows(10, 3, 5) == 2 and r1.local_windows(10, 3, 10) == 4 and r1.local_batches(3) == 1
    with pytest.raises(fq.FlexQuantError):
        Dist(rank=0, world=4).shard(ids, 4)
