"""`dfkd bench` counts each phase's floating-point operations and measures the matmul peak."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from dfkd.bench import phase_flops
from dfkd.perf import matmul_peak


def test_phase_flops_match_the_networks_own_counts(tiny, tmp_path, run_of):
    cfg = tiny(method={"reuse_samples": True})
    run = run_of(cfg, tmp_path)
    flops = phase_flops(run)
    x = torch.zeros(cfg.train.batch_size, 1, 32, 32)
    with FlopCounterMode(display=False) as student:
        run.game.student(x)
    # one student forward in the generator step, one per student step
    assert flops["student forward"] == (1 + cfg.method.n_student_steps) * student.get_total_flops()
    assert flops["backward (generator step)"] > 0 and flops["generator forward"] > 0
    assert not run.game.phases.enabled and not run.game.phases.count_flops, "counting is off again"


def test_matmul_peak_is_a_plausible_rate():
    peak = matmul_peak(torch.device("cpu"), n=256, repeats=3)
    assert 1e8 < peak < 1e14
