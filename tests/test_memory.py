"""The balanced memory bank: balance, reversed sampling, overflow, determinism, bad input."""

import math

import pytest
import torch

from bmb.memory import BalancedMemoryBank

C = 10


def lt_probs(gamma: float = 100.0) -> torch.Tensor:
    mu = (1 / gamma) ** (1 / (C - 1))
    p = torch.tensor([mu**k for k in range(C)], dtype=torch.float64)
    return p / p.sum()


def stream(bank: BalancedMemoryBank, steps: int = 1000, batch: int = 64, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    p = lt_probs()
    for _ in range(steps):
        y = torch.multinomial(p, batch, replacement=True, generator=g)
        bank.enqueue(torch.randn(batch, 8, generator=g), y)


def entropy(counts: torch.Tensor) -> float:
    q = counts.double() / counts.sum()
    q = q[q > 0]
    return float(-(q * q.log()).sum() / math.log(C))


def make(beta: float = 3.0, gamma: float = 1.0, seed: int = 0, capacity: int = 128) -> BalancedMemoryBank:
    return BalancedMemoryBank(capacity, 8, C, put_power=beta, get_power=gamma,
                              generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def filled() -> dict[float, BalancedMemoryBank]:
    banks = {}
    for beta in (0.0, 3.0):
        banks[beta] = make(beta)
        stream(banks[beta])
    return banks


def test_bank_is_balanced_with_beta3_and_not_with_beta0(filled):
    h3, h0 = entropy(filled[3.0].class_counts()), entropy(filled[0.0].class_counts())
    assert len(filled[3.0]) == 128 and len(filled[0.0]) == 128
    assert h3 >= 0.93, h3
    assert h0 < h3 - 0.1, (h0, h3)


def test_get_overdraws_rare_classes_and_more_with_larger_gamma(filled):
    bank = filled[3.0]
    prior = lt_probs() * 10000  # N-hat: the unlabeled data are long-tailed
    rare = torch.arange(C - 3, C)
    share_bank = float(bank.class_counts()[rare].sum()) / len(bank)
    shares = []
    for gamma in (0.5, 1.0, 2.0):
        bank.get_power = gamma
        drawn = torch.cat([bank.get(64, prior, replacement=False)[1] for _ in range(200)])
        shares.append(float(torch.isin(drawn, rare).float().mean()))
    bank.get_power = 1.0
    assert shares[0] > share_bank, (shares, share_bank)
    assert shares[0] < shares[1] < shares[2], shares


def test_overflow_removes_exactly_the_excess():
    bank = make(beta=0.0, capacity=100)  # beta 0: every candidate enters
    g = torch.Generator().manual_seed(3)
    bank.enqueue(torch.randn(70, 8, generator=g), torch.randint(0, C, (70,), generator=g))
    assert len(bank) == 70
    feats = torch.randn(50, 8, generator=g)
    accepted = bank.enqueue(feats, torch.randint(0, C, (50,), generator=g))
    assert int(accepted.sum()) == 50 and len(bank) == 100
    # a batch larger than the capacity alone
    accepted = bank.enqueue(torch.randn(300, 8, generator=g), torch.randint(0, C, (300,), generator=g))
    assert len(bank) == 100 and bank.features.shape == (100, 8)
    assert int(bank.class_counts().sum()) == 100


def test_dequeue_removes_majority_classes_first():
    bank = make(beta=3.0, capacity=20)
    bank.put_power = 0.0  # fill unconditionally: 18 of class 0, 2 of class 1
    bank.enqueue(torch.randn(20, 8), torch.tensor([0] * 18 + [1] * 2))
    bank.put_power = 3.0
    bank.enqueue(torch.randn(5, 8), torch.full((5,), 2))  # class 2 absent: P_put = 1 for the first
    counts = bank.class_counts()
    assert len(bank) == 20 and counts[1] == 2 and counts[2] >= 1 and counts[0] <= 17


def test_same_seed_same_bank_and_state_roundtrip():
    a, b = make(seed=5), make(seed=5)
    stream(a, steps=50)
    stream(b, steps=50)
    assert torch.equal(a.features, b.features) and torch.equal(a.labels, b.labels)
    sd = a.state_dict()
    c = make(seed=999)  # different generator state, overwritten by the load
    c.load_state_dict(sd)
    prior = torch.arange(1, C + 1).double()
    for _ in range(5):
        fa, la = a.get(32, prior, replacement=False)
        fc, lc = c.get(32, prior, replacement=False)
        assert torch.equal(fa, fc) and torch.equal(la, lc)
    x, y = torch.randn(64, 8), torch.randint(0, C, (64,))
    assert torch.equal(a.enqueue(x, y), c.enqueue(x, y))
    assert torch.equal(a.features, c.features) and torch.equal(a.labels, c.labels)


def test_get_with_replacement_and_small_bank():
    bank = make(beta=0.0)
    bank.enqueue(torch.randn(5, 8), torch.arange(5))
    f, y = bank.get(64, torch.ones(C), replacement=False)
    assert f.shape == (5, 8) and sorted(y.tolist()) == [0, 1, 2, 3, 4]  # without replacement: all 5
    f, y = bank.get(64, torch.ones(C), replacement=True)
    assert f.shape == (64, 8) and set(y.tolist()) <= set(range(5))


def test_meta_device_and_no_cuda_calls(monkeypatch):
    meta = BalancedMemoryBank(16, 4, 3, put_power=1.0, get_power=1.0, device="meta")
    assert len(meta) == 0 and meta.features.device.type == "meta"
    with pytest.raises(ValueError, match="meta"):
        meta.enqueue(torch.randn(2, 4), torch.tensor([0, 1]))

    def boom(*a, **k):
        raise AssertionError("CUDA was called")

    for name in ("is_available", "current_device", "synchronize", "device_count", "_lazy_init"):
        monkeypatch.setattr(torch.cuda, name, boom)
    bank = meta.to("cpu")
    bank.enqueue(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    bank.get(4, torch.ones(3), replacement=False)
    bank.load_state_dict(bank.state_dict())


@pytest.mark.parametrize("call, match", [
    (lambda b: b.enqueue(torch.randn(4, 7), torch.zeros(4, dtype=torch.long)), "shape"),
    (lambda b: b.enqueue(torch.randn(4, 8), torch.zeros(3, dtype=torch.long)), "labels must have shape"),
    (lambda b: b.enqueue(torch.randn(4, 8), torch.zeros(4, dtype=torch.int32)), "int64"),
    (lambda b: b.enqueue(torch.randint(0, 5, (4, 8)), torch.zeros(4, dtype=torch.long)), "floating"),
    (lambda b: b.enqueue(torch.randn(4, 8), torch.tensor([0, 1, 2, C])), r"\[0, 10\)"),
    (lambda b: b.enqueue(torch.randn(4, 8), torch.tensor([0, -1, 2, 3])), r"\[0, 10\)"),
    (lambda b: b.enqueue(torch.full((4, 8), float("nan")), torch.zeros(4, dtype=torch.long)), "NaN"),
    (lambda b: b.get(0, torch.ones(C), replacement=False), "n must be"),
    (lambda b: b.get(4, torch.ones(C + 1), replacement=False), "class_prior"),
    (lambda b: b.get(4, -torch.ones(C), replacement=False), "class_prior"),
])
def test_bad_input_raises_and_leaves_state_untouched(call, match):
    bank = make(beta=0.0)
    bank.enqueue(torch.randn(10, 8), torch.arange(10))
    before = bank.state_dict()
    with pytest.raises(ValueError, match=match):
        call(bank)
    after = bank.state_dict()
    assert torch.equal(before["features"], after["features"]) and torch.equal(before["labels"], after["labels"])
    assert torch.equal(before["generator"], after["generator"])


def test_constructor_and_empty_get_errors():
    with pytest.raises(ValueError, match="capacity"):
        BalancedMemoryBank(0, 8, C, put_power=1.0, get_power=1.0)
    with pytest.raises(ValueError, match="put_power"):
        BalancedMemoryBank(8, 8, C, put_power=-1, get_power=1.0)
    with pytest.raises(ValueError, match="get_power"):
        BalancedMemoryBank(8, 8, C, put_power=1.0, get_power=-0.5)
    with pytest.raises(ValueError, match="empty"):
        make().get(4, torch.ones(C), replacement=False)


# ----------------------------------------------------------------------------- fixed shapes
def test_invalid_candidates_never_enter_and_do_not_count():
    bank = make(beta=0.0, capacity=16)
    x, y = torch.randn(12, 8), torch.arange(12) % C
    valid = torch.arange(12) % 3 == 0
    accept = bank.enqueue(x, y, valid=valid)
    assert torch.equal(accept, valid)  # beta 0 accepts every candidate, and only candidates
    assert torch.equal(bank.features, x[valid]) and torch.equal(bank.labels, y[valid])
    # With balancing on, the invalid rows must not raise the ranks of the valid ones: a class-0
    # candidate behind ten invalid class-0 rows is decided as if it came first.
    a, b = make(beta=3.0, seed=5), make(beta=3.0, seed=5)
    a.enqueue(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]))
    b.enqueue(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]))
    lab = torch.zeros(11, dtype=torch.long)
    got_a = a.enqueue(torch.randn(11, 8), lab, valid=torch.arange(11) == 10)
    got_b = b.enqueue(torch.randn(11, 8), lab, valid=torch.arange(11) == 0)
    assert bool(got_a[10]) and bool(got_b[0])  # P_put = ((0 + 1) / (0 + 1))^3 = 1 for each


def test_random_consumption_does_not_depend_on_the_data():
    """Fixed shapes: the generator advances by the same amount whatever the candidates are, so
    no host decision on data-dependent sizes is ever needed."""
    states = []
    for seed, frac in ((1, 0.0), (2, 0.5), (3, 1.0)):
        bank = make(beta=2.0, capacity=32, seed=0)
        g = torch.Generator().manual_seed(seed)
        for _ in range(6):
            y = torch.randint(0, C, (24,), generator=g)
            bank.enqueue(torch.randn(24, 8, generator=g), y, valid=torch.rand(24, generator=g) < frac)
            bank.draw(16, torch.rand(C, generator=g) * 50, replacement=False)
        states.append(bank.generator.get_state())
    assert all(torch.equal(states[0], s) for s in states[1:])


def test_draw_has_fixed_shapes_and_get_is_draw_without_invalid_rows():
    bank = make(beta=0.0, capacity=32)
    f, y, v = bank.draw(8, torch.ones(C), replacement=False)
    assert f.shape == (8, 8) and y.shape == (8,) and not v.any()  # empty bank: nothing valid
    bank.enqueue(torch.randn(5, 8), torch.arange(5))
    for n, replacement in ((3, False), (8, False), (40, False), (8, True)):
        state = bank.generator.get_state()
        f, y, v = bank.draw(n, torch.arange(1, C + 1).double(), replacement=replacement)
        assert f.shape == (n, 8) and y.shape == v.shape == (n,)
        valid = n if replacement else min(n, 5)
        assert int(v.sum()) == valid and bool(v[:valid].all())  # valid rows come first
        assert bool((y[~v] == 0).all())  # invalid rows carry a safe label
        bank.generator.set_state(state)
        gf, gy = bank.get(n, torch.arange(1, C + 1).double(), replacement=replacement)
        assert torch.equal(gf, f[v]) and torch.equal(gy, y[v])
        rows = (f[v][:, None, :] == bank.features[None]).all(-1)
        assert bool((rows.sum(1) == 1).all()) and bool((y[v] == bank.labels[rows.float().argmax(1)]).all())


def test_clear_empties_in_place_and_reallocation_bumps_the_version():
    bank = BalancedMemoryBank(8, 3, 4, put_power=1.0, get_power=1.0, generator=torch.Generator().manual_seed(0))
    buffers, version = bank.state_tensors(), bank.version
    bank.enqueue(torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert len(bank) > 0
    bank.clear()
    assert len(bank) == 0 and bank.class_counts().sum() == 0
    assert all(a is b for a, b in zip(buffers, bank.state_tensors()))
    assert bank.version == version  # same buffers: CUDA graphs captured on them stay valid
    bank.load_state_dict(bank.state_dict())
    assert bank.version == version + 1


def test_step_graphs_need_a_cuda_bank_and_generator_and_otherwise_run_eagerly():
    from bmb.graphs import StepGraphs

    bank = BalancedMemoryBank(8, 3, 4, put_power=1.0, get_power=1.0, generator=torch.Generator().manual_seed(0))
    graphs = StepGraphs(bank)
    assert not StepGraphs.supported(bank) and not graphs.enabled
    # Eager: the function gets its uniforms from the bank's generator, as torch.rand would draw them.
    got = graphs.run(("f",), lambda x, u, v: (x + 1, u, v), [torch.zeros(2)], uniforms=[3, 2])
    want = torch.rand(5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(got[0], torch.ones(2))
    assert torch.equal(torch.cat(got[1:]), want)


# ----------------------------------------------------------------------------- enqueue cost
def _reference_enqueue_core(bank: BalancedMemoryBank, features, labels, ok, u_accept, u_race):
    """The enqueue_core of commit 0fb8cc3, kept verbatim as the reference: a dense (B, C + 1)
    one-hot for the ranks and a mask-indexed removal. The fast version must match it bit for bit."""
    c, cap = bank.num_classes, bank.capacity
    b = labels.shape[0]
    u_accept, u_race = u_accept.clamp_min(torch.finfo(torch.float64).tiny), u_race.clamp_min(
        torch.finfo(torch.float64).tiny)
    lab = torch.where(ok, labels, c)
    counts = bank._counts_with_empty(bank._labels_all)
    onehot = (lab[:, None] == torch.arange(c + 1)).long()
    rank = (onehot.cumsum(0) - onehot).gather(1, lab[:, None]).squeeze(1)
    eff = (counts[lab] + rank).to(torch.float64)
    p_put = ((counts[:c].min().to(torch.float64) + 1.0) / (eff + 1.0)).pow(bank.put_power)
    accept = ok & (u_accept < p_put)
    union = torch.cat([bank._labels_all, torch.where(accept, labels, c)])
    union_counts = bank._counts_with_empty(union)
    p_keep = torch.cat([bank.put_probability(union_counts[:c]), union_counts.new_ones(1).double()])
    weights = (1.0 - p_keep + 1e-6)[union] * (union < c)
    excess = (bank._size + accept.sum() - cap).clamp_min(0)
    order = torch.argsort(-torch.log(u_race) / weights, stable=True)
    removed = torch.zeros(cap + b, dtype=torch.bool)
    removed[order] = torch.arange(cap + b) < excess
    free = (bank._slots >= bank._size) | removed[:cap]
    free_rank = free.cumsum(0) - 1
    slot_of_rank = torch.full((cap + 1,), cap, dtype=torch.long)
    slot_of_rank.scatter_(0, torch.where(free, free_rank, cap), bank._slots)
    survive = accept & ~removed[cap:]
    new_rank = (survive.cumsum(0) - 1).clamp_(0, cap)
    target = torch.where(survive, slot_of_rank[new_rank], cap)
    bank._buf_feats.index_copy_(0, target, features)
    bank._buf_labels.index_copy_(0, target, labels)
    bank._buf_labels[cap:].fill_(c)
    bank._size.copy_(torch.clamp(bank._size + accept.sum(), max=cap))
    return accept


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("classes", [10, 100, 1000])
def test_enqueue_core_matches_the_dense_reference_bit_for_bit(classes):
    """Same uniforms, same decisions: accept masks, every stored bit (signed zeros included),
    labels (scratch row included) and size equal the one-hot reference's, through the empty,
    filling and overflowing bank, batches smaller and larger than the capacity, invalid rows,
    skewed and uniform labels and tied uniforms."""
    cap, dim = 64, 12
    g = torch.Generator().manual_seed(classes)
    for put_power in (0.0, 1.0, 3.0):
        new = BalancedMemoryBank(cap, dim, classes, put_power=put_power, get_power=1.0)
        ref = BalancedMemoryBank(cap, dim, classes, put_power=put_power, get_power=1.0)
        for step in range(24):
            b = (7, 48, 150)[step % 3]
            feats = torch.randn(b, dim, generator=g)
            feats[torch.rand(b, dim, generator=g) < 0.05] = -0.0
            if step % 4 == 0:  # a few classes only: long same-class runs
                labels = torch.randint(0, min(classes, 3), (b,), generator=g)
            else:
                labels = torch.randint(0, classes, (b,), generator=g)
            ok = torch.rand(b, generator=g) < (1.0 if step % 5 == 0 else 0.7)
            n_accept, n_race = new.uniforms_per_enqueue(b)
            u_accept = torch.rand(n_accept, generator=g, dtype=torch.float64)
            u_race = torch.rand(n_race, generator=g, dtype=torch.float64)
            if step % 6 == 5:  # ties: equal race keys within a class, exact zeros
                u_race = (u_race * 4).floor() / 4
                u_accept = (u_accept * 2).floor() / 2
            got = new.enqueue_core(feats, labels, ok, u_accept, u_race)
            want = _reference_enqueue_core(ref, feats, labels, ok, u_accept, u_race)
            assert torch.equal(got, want), (put_power, step)
            for a, r in zip(new.state_tensors(), ref.state_tensors()):
                assert torch.equal(_bits(a), _bits(r)), (put_power, step)
        assert len(new) == cap  # the stream overflowed the bank



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [8, 12, 5])
def test_row_copy_is_index_copy_bit_for_bit(dtype, dim):
    """The CPU row copy (16-byte words where the layout allows, else the plain index_copy_)
    writes exactly what index_copy_ writes, for contiguous and strided sources."""
    from bmb.memory import _copy_rows

    g = torch.Generator().manual_seed(dim)
    dst = torch.randn(33, dim, generator=g).to(dtype)
    wide = torch.randn(20, dim + 4, generator=g).to(dtype)
    wide[::2, 1] = -0.0
    index = torch.randperm(32, generator=g)[:20]
    index[::3] = 32  # duplicates into a scratch row, as enqueue_core writes rejected candidates
    for src in (wide[:, :dim].contiguous(), wide[:, :dim], wide[:, 2:dim + 2]):
        want = dst.clone().index_copy_(0, index, src)
        got = dst.clone()
        _copy_rows(got, index, src)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
