"""Each head against ``avg``, paired by seed: the CI, the verdicts and the table's wording."""

from __future__ import annotations

import math

import pytest

from globalpool.lab.experiments.paired import format_difference, paired_difference
from globalpool.lab.experiments.report import markdown_table, summarize

# Student t quantile t_{0.975, 2}, from tables: 4.302652729749464.
T_975_2 = 4.302652729749464


def _rec(head: str, seed: int, acc: float, size: int = 100) -> dict:
    return {
        "spec": {"head": head, "seed": seed}, "train_size": size, "accuracy": acc,
        "accuracies": {"test": acc}, "params_total": 10, "params_head": 2,
        "train_time_s": 1.0, "peak_memory_bytes": 1, "train_throughput": 1.0,
        "eval_throughput": 1.0,
    }  # fmt: skip


def test_paired_ci_matches_a_hand_computed_example():
    # gem - avg per seed: 0.01, 0.02, 0.03 -> mean 0.02, sample std 0.01,
    # half width t_{0.975,2} * 0.01 / sqrt(3) = 0.024841...
    d = paired_difference({0: 0.91, 1: 0.93, 2: 0.95}, {0: 0.90, 1: 0.91, 2: 0.92})
    assert d["seeds"] == [0, 1, 2] and d["n"] == 3
    assert d["values"] == pytest.approx([0.01, 0.02, 0.03])
    assert d["mean"] == pytest.approx(0.02)
    assert d["ci95"] == pytest.approx(T_975_2 * 0.01 / math.sqrt(3))
    # 0.02 - 0.0248 < 0: the interval holds 0, though every seed's difference is positive
    assert d["verdict"] == "inconclusive"


def test_paired_verdicts_follow_the_sign_of_the_whole_interval():
    base = {0: 0.80, 1: 0.85, 2: 0.90}
    up = paired_difference({0: 0.82, 1: 0.87, 2: 0.93}, base)  # +0.02, +0.02, +0.03
    assert up["mean"] == pytest.approx(0.07 / 3)
    assert up["ci95"] == pytest.approx(T_975_2 * math.sqrt(1 / 3) * 1e-2 / math.sqrt(3))
    assert up["verdict"] == "better"
    down = paired_difference({0: 0.70, 1: 0.74, 2: 0.81}, base)  # -0.10, -0.11, -0.09
    assert down["verdict"] == "worse"
    assert format_difference(down) == "−10.0 ± 2.5"
    one = paired_difference({0: 0.99}, base)
    assert one["ci95"] is None and one["verdict"] == "inconclusive"
    assert format_difference(one) == "+19.0"


def test_pairs_only_the_seeds_both_heads_ran():
    d = paired_difference({0: 0.5, 1: 0.6, 2: 0.7}, {1: 0.5, 2: 0.5, 3: 0.9})
    assert d["seeds"] == [1, 2] and d["values"] == pytest.approx([0.1, 0.2])
    assert paired_difference({0: 0.5}, {1: 0.5}) is None
    assert paired_difference({0: None}, {0: 0.5}) is None


def test_summarize_pairs_by_seed_not_by_order():
    recs = [_rec("avg", s, a) for s, a in [(2, 0.92), (0, 0.90), (1, 0.91)]]
    recs += [_rec("gem", s, a) for s, a in [(1, 0.93), (2, 0.95), (0, 0.91)]]
    rows = summarize(recs)
    avg, gem = rows
    assert avg["vs_avg"] is None
    assert gem["vs_avg"]["values"] == pytest.approx([0.01, 0.02, 0.03])
    assert gem["vs_avg"]["ci95"] == pytest.approx(T_975_2 * 0.01 / math.sqrt(3))


def test_table_bolds_heads_better_than_avg_and_names_the_others():
    accs = {
        "avg": [0.80, 0.85, 0.90],
        "gem": [0.82, 0.87, 0.93],  # better: +2.3 ± 1.4
        "max": [0.70, 0.74, 0.81],  # worse: -10.0 ± 2.5
        "fc": [0.81, 0.84, 0.92],  # +1, -1, +2: inconclusive
    }
    recs = [_rec(h, s, a) for h, vals in accs.items() for s, a in enumerate(vals)]
    table = markdown_table(summarize(recs))
    assert "Δ vs `avg` pp (paired)" in table
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if "| `" in line}
    assert "**87.3 ± 13.7**" in lines["`gem`"] and "**+2.3 ± 1.4** better" in lines["`gem`"]
    assert "−10.0 ± 2.5 worse" in lines["`max`"] and "**" not in lines["`max`"]
    assert "**" not in lines["`fc`"] and "**" not in lines["`avg`"]
    assert "| baseline |" in lines["`avg`"]
    assert "Bold in this table: `gem` (+2.3 ± 1.4 pp), better than `avg`" in table
    assert "Worse than `avg`" in table and "`max` (−10.0 ± 2.5 pp)" in table
    assert "Not shown to differ from `avg`" in table and "`fc` (+0.7 ± 3.8 pp)" in table
    # the per-head CIs overlap everywhere: the old rule would bold nothing
    assert "overlapping 95% CIs" not in table


def test_table_without_a_better_head_says_so_and_sizes_are_paired_apart():
    recs = [_rec("avg", s, 0.9) for s in range(2)] + [_rec("max", s, 0.8) for s in range(2)]
    recs += [_rec("avg", s, 0.5, size=10) for s in range(2)]
    recs += [_rec("max", s, a, size=10) for s, a in enumerate([0.60, 0.45])]
    table = markdown_table(summarize(recs))
    assert "**" not in table  # nothing bold
    assert "No head is bold in train n=100: none is better than `avg`" in table
    # n=100: max - avg = -0.1 both seeds: the CI has zero width, below 0
    assert "Worse than `avg`" in table and "`max` (−10.0 ± 0.0 pp)" in table
    # n=10: +0.10, -0.05 -> mean 0.025, std 0.1061, half 12.706 * 0.1061 / sqrt(2) = 0.953
    assert "Not shown to differ from `avg` (the CI contains 0, or one seed): `max` (+2.5 ± 95.3" in table


def test_without_avg_the_overlap_rule_stays():
    recs = [_rec("gem", s, 0.90 + s / 100) for s in range(3)]
    recs += [_rec("max", s, 0.50 + s / 100) for s in range(3)]
    rows = summarize(recs)
    assert all(r["vs_avg"] is None for r in rows)
    table = markdown_table(rows)
    assert "Δ vs" not in table
    assert "Bold in this table: `gem`, the best test accuracy" in table
