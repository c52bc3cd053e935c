"""`dtrpo bench`: the step cost of each block grid, side by side."""

from dtrpo.apps.bench import BenchArgs, grid_costs


def test_bench_times_both_grids_side_by_side():
    rows = grid_costs(BenchArgs(pairs=4, prompt_length=9, response_length=8, block_size=4, repeats=1))
    assert rows["response_grid"]["ratio_to_response_grid"] == 1.0
    # prompts of 9, 8, 7, 6 tokens: tails 1, 0, 3, 2; the tail copy is 3 columns wide
    assert rows["absolute_grid"]["packed_columns"] - rows["response_grid"]["packed_columns"] == 3
    assert all(r["seconds_per_pair"] > 0 for r in rows.values())
