"""``onnxprune`` with the proposed auto default for ``--ratio``: latency-weighted ratios, for bench/latency.py.

    python bench/latency_weighted_cli.py prune MODEL -o OUT --ratio R [flags...]

`onnxprune.passes.latency_select.weighted_ratio_plan` gives, for a plain ``--ratio`` under ``--round-to
auto``, the plan that removes the same fraction of channels with each group's share weighted by its time per
MAC (`onnxprune.latency.weighted`; uniform where the uniform ratio's efficiency bound reaches 0.9). The call
belongs in ``SelectChannelsPass.choose`` (passes/select.py, not wired there yet); this wrapper applies it to
the plan that method returns and runs the normal command line, so the bench measures exactly what the CLI
would write once it is wired. With ``--round-to N``, an explicit ``--allocation``, ``--global`` or a target
it changes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxprune.passes import select
from onnxprune.passes.latency_select import latency_grid, weighted_ratio_plan

_choose = select.SelectChannelsPass.choose


def _weighted_choose(self, analysis, stats=None, measured=None):  # the signature of SelectChannelsPass.choose
    plan, table, report, notices = _choose(self, analysis, stats, measured)
    if report is None and table is not None:
        keep_counts, _, _ = latency_grid(self.config, analysis)  # the table is cached for this model
        criterion = self.criterion or select.criterion_for(self.config, stats)
        weighted = weighted_ratio_plan(self.config, analysis, criterion.score_all(analysis), table, keep_counts)
        if weighted is not None:
            plan = weighted
    return plan, table, report, notices


select.SelectChannelsPass.choose = _weighted_choose  # type: ignore[method-assign]

if __name__ == "__main__":
    from onnxprune.cli import main

    sys.exit(main())
