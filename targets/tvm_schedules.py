"""Default CPU schedules (placeholder)."""
from __future__ import annotations
import tvm

def relax_layout_passes(target):
    return []

def tune(mod, target, trials, work_dir):
    raise NotImplementedError

def ApplyCPUSchedules(target):
    return tvm.transform.Sequential([])
