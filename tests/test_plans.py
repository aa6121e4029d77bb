"""Plan building blocks: live sets, the kept set of token dropping, the importance-table
update, the random-LTD schedule."""

import torch

from megatron_effmlm.model.plan import LiveSet
from megatron_effmlm.plans import get_policy
from megatron_effmlm.plans.random_ltd import ltd_length
from megatron_effmlm.plans.token_drop import PIN, select_kept


def test_live_set_from_mask_is_position_ordered_and_padded():
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    live = LiveSet.from_mask(mask)
    assert live.idx.tolist() == [[1, 2, 4], [0, 5, 5]]  # padded slots point at the bin row T
    assert live.valid.tolist() == [[True, True, True], [True, False, False]]


def test_select_kept_ties_padding_and_ratio():
    scores = torch.tensor([[5.0, 1.0, 5.0, 5.0, 2.0, 9.0], [3.0, 3.0, 3.0, 3.0, 100.0, 100.0]])
    pad = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    live = select_kept(scores, pad, keep_ratio=0.5)
    # row 0: k = 3 of 6: 9.0 (pos 5), then the tie at 5.0 goes to the lower positions 0 and 2
    assert live.idx[0][live.valid[0]].tolist() == [0, 2, 5]
    # row 1: 4 real tokens -> k = 2; padding never kept however high its score; ties -> 0, 1
    assert live.idx[1][live.valid[1]].tolist() == [0, 1]


def test_importance_table_update_and_pins(demo_tokenizer, mcore_single):
    from megatron_effmlm.model.plan import MLMOutput

    tok = demo_tokenizer
    p = get_policy("token-drop", tokenizer=tok, num_layers=4, td_beta=0.9)
    a, b = 100, 200
    out = MLMOutput(lm_losses=torch.tensor([2.0, 4.0, 1.0, 7.0]), labels=torch.tensor([a, a, b, tok.cls]))
    p.loss(out)
    p.after_step(1)
    assert p.importance[a].item() == 0.9 * 10.0 + 0.1 * 3.0  # the step's mean loss of that label
    assert p.importance[b].item() == 0.9 * 10.0 + 0.1 * 1.0
    assert p.importance[300].item() == 10.0  # not a label this step: unchanged
    assert p.importance[tok.cls].item() == PIN and p.importance[tok.mask].item() == PIN  # re-pinned
    assert p.importance[tok.pad].item() == -PIN
    p.after_step(2)  # no predictions recorded: nothing moves
    assert p.importance[a].item() == 0.9 * 10.0 + 0.1 * 3.0
    # [MASK] inputs are always kept; the table is part of the checkpoint
    state = p.state_dict()
    q = get_policy("token-drop", tokenizer=tok, num_layers=4)
    q.load_state_dict(state)
    assert torch.equal(q.importance, p.importance)


def test_masked_tokens_are_kept(demo_tokenizer, demo_batch):
    tok = demo_tokenizer
    p = get_policy("token-drop", tokenizer=tok, num_layers=4)
    batch = {k: v.clone() for k, v in demo_batch.items()}
    kept = p.kept(batch)
    is_kept = torch.zeros_like(batch["padding_mask"], dtype=torch.bool)
    is_kept.scatter_(1, kept.idx.clamp(max=63), kept.valid)
    masks = (batch["text"] == tok.mask) & batch["padding_mask"].bool()
    assert masks.any() and bool(is_kept[masks].all())
    assert not is_kept[batch["padding_mask"] == 0].any()


def test_random_ltd_schedule():
    T = 512
    assert ltd_length(0, T, 128, 100, 16) == 128
    assert ltd_length(50, T, 128, 100, 16) == 320  # halfway, on the 16-token grid
    assert ltd_length(51, T, 128, 100, 16) == 320 + 0  # 323.84 floors to 320
    assert ltd_length(55, T, 128, 100, 16) == 336
    assert ltd_length(100, T, 128, 100, 16) == T and ltd_length(10**6, T, 128, 100, 16) == T


def test_random_ltd_draws_are_uniform_and_row_local():
    from megatron_effmlm.plans.random_ltd import uniform_hash

    t = torch.randint(0, 4000, (64, 512), generator=torch.Generator().manual_seed(0))
    u = uniform_hash(t, 1, 2, 3)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 12 ** -0.5) < 0.01
    assert torch.equal(uniform_hash(t[5:7], 1, 2, 3), u[5:7])  # a row's draw ignores its neighbours
    assert not torch.equal(uniform_hash(t, 1, 2, 4), u) and not torch.equal(uniform_hash(t, 1, 3, 3), u)
    # every position is picked about equally often (64 of 512: expected 8 per position)
    counts = torch.bincount(u.topk(64, dim=1).indices.flatten(), minlength=512).float()
    assert abs(counts.mean() - 8) < 1e-6 and counts.std() < 3.5


def test_split_by_flops_is_the_optimal_contiguous_split():
    import itertools

    from megatron_effmlm.model.flops import Shape
    from megatron_effmlm.parallel.balance import split_by_flops, stage_loads
    from megatron_effmlm.plans import POLICIES

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        costs = (torch.rand(7, generator=g) * 10 + 1).tolist()
        extra = float(torch.rand(1, generator=g) * 15)
        got = split_by_flops(costs, extra, 3)
        best = min(max(stage_loads(costs, extra, [a, b, 7 - a - b]))
                   for a, b in itertools.product(range(1, 6), repeat=2) if a + b < 7)
        assert sum(got) == 7 and min(got) >= 1
        assert abs(max(stage_loads(costs, extra, got)) - best) < 1e-9
    # 3ML's decoder and the head weigh on the last stage: it gets the fewest encoder layers
    costs, extra = POLICIES["3ml"].layer_costs(Shape(12, 512, 768, 3072, 30592, 0.5))
    counts = split_by_flops(costs, extra, 4)
    assert counts[-1] == min(counts) and sum(counts) == 12
    # random-LTD's middle layers are cheaper than its first and last: not vanilla's even split
    costs, extra = POLICIES["random-ltd"].layer_costs(Shape(12, 512, 768, 3072, 30592, 0.15), ltd_start=128)
    assert costs[0] == costs[-1] > costs[1] == costs[-2]
    assert split_by_flops(costs, extra, 4) != [3, 3, 3, 3]
