from unlearnlm.data.schedule import FORGET, RETAIN, CyclicSampler, chunk_schedule, interleave, split_chunks


def test_chunks_are_disjoint_ordered_and_cover_with_a_remainder():
    chunks = split_chunks(10, 4)
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_chunks(3, None) == [[0, 1, 2]]
    assert split_chunks(0, 4) == []


def test_cyclic_sampler_wraps_and_uses_every_row_before_repeating():
    sampler = CyclicSampler(5)
    assert sampler.take(3) == [0, 1, 2]
    assert sampler.take(4) == [3, 4, 0, 1]
    assert sampler.take(5) == [2, 3, 4, 0, 1]


def test_interleave_one_forget_then_ratio_retain():
    items = interleave([0, 1], [10, 11, 12, 13], 2)
    assert [(i.role, i.index) for i in items] == [
        (FORGET, 0), (RETAIN, 10), (RETAIN, 11), (FORGET, 1), (RETAIN, 12), (RETAIN, 13)]


def test_schedule_pairs_each_chunk_with_chunk_size_times_ratio_cyclic_retain():
    phases = chunk_schedule(n_forget=5, n_retain=7, chunk_size=2, ratio=3, epochs=4)
    assert [p.epochs for p in phases] == [4, 4, 4]
    forget = [[i.index for i in p.items if i.role == FORGET] for p in phases]
    retain = [[i.index for i in p.items if i.role == RETAIN] for p in phases]
    assert forget == [[0, 1], [2, 3], [4]]
    # 6, 6 and 3 retain rows, the running index wrapping around the 7 retain rows.
    assert retain == [[0, 1, 2, 3, 4, 5], [6, 0, 1, 2, 3, 4], [5, 6, 0]]
    assert [i.role for i in phases[2].items] == [FORGET, RETAIN, RETAIN, RETAIN]


def test_ratio_zero_is_forget_only():
    phases = chunk_schedule(4, 10, None, 0, 1)
    assert len(phases) == 1 and all(i.role == FORGET for i in phases[0].items)
