"""bench/ratio_candidates.py: every candidate of an auto-rounded --ratio, the table's prediction beside the measurement."""

from __future__ import annotations

import re

from bench import ratio_candidates


def test_every_candidate_is_predicted_and_measured_on_the_bundled_cnn(tmp_path):
    lines = ratio_candidates.candidates("fashion_mnist_cnn", 0.7, threads=1, repeat=3, latency_cache=str(tmp_path))
    head, rows = lines[0], lines[1:]
    assert head.startswith("fashion_mnist_cnn @ 0.7 (1 thread(s)") and "the table's choice" in head
    names = [row.split("  predicted")[0].strip() for row in rows]
    assert names[:2] == ["uniform, any count", "uniform, on the grid"] and len(names) > 2  # weighted ones too
    assert head.split("the table's choice ")[1] in names
    for row in rows:
        numbers = re.search(r"predicted +([\d.]+)x \(([\d.]+)\) +measured +([\d.]+)x \(([\d.]+)\).*MACs /([\d.]+)", row)
        assert numbers, row
        assert all(float(x) > 0 for x in numbers.groups())
        assert float(numbers.group(5)) > 1  # every candidate removed something
