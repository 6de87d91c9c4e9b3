"""Dealing a set's batches over ranks: every batch is one rank's, every rank runs as many batches."""

import torch

from vlmtrain.eval.ranks import Deal, Ranks, batched


def test_batches_are_dealt_round_robin_and_a_short_last_round_is_padded():
    batches = list(batched(range(26), 4))  # 7 batches: rounds of 3 leave ranks 1 and 2 without a 7th
    assert [len(b) for b in batches] == [4] * 6 + [2]
    dealt = {rank: list(Deal(batches, Ranks(rank, 3))) for rank in range(3)}
    assert {rank: [(b[0], own) for b, own in got] for rank, got in dealt.items()} == {
        0: [(0, True), (12, True), (24, True)],
        1: [(4, True), (16, True), (24, False)],  # the last round's first batch again, its result dropped
        2: [(8, True), (20, True), (24, False)],
    }
    owned = sorted(x for got in dealt.values() for batch, own in got if own for x in batch)
    assert owned == list(range(26))


def test_one_rank_runs_every_batch_and_gathers_its_own_rows():
    deal = Deal(batched(range(5), 2), Ranks())
    rows = [torch.tensor(batch)[:, None] for batch, own in deal if own]
    assert deal.sizes == [2, 2, 1]
    assert deal.gather(rows).flatten().tolist() == [0, 1, 2, 3, 4]
    assert Deal([], Ranks(1, 2)).gather([]).numel() == 0  # an empty set: no rank runs anything
    assert list(Deal([], Ranks(1, 2))) == []
