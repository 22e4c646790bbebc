"""One torchrun process of tests/test_distributed.py: the real `dfkd run`. Each rank keeps the
batches its student steps drew and, on the way out, saves them with its own student weights
(rank 0 alone writes the run)."""

import os
import sys
from pathlib import Path

import torch

from dfkd import cli
from dfkd.batches import StudentBatches
from dfkd.loop import Run

dump = Path(os.environ["DFKD_TEST_DUMP"])
rank = os.environ["RANK"]
drawn = []
draw, finish = StudentBatches.draw, Run.finish


def draw_and_keep(self, latest):
    batch = draw(self, latest)
    drawn.append(batch[0].clone())
    return batch


def finish_and_dump(self, tracker):
    student = self.game.student.state_dict()
    torch.save({k: v.clone() for k, v in student.items()}, dump / f"student_rank{rank}.pt")
    torch.save(torch.stack(drawn), dump / f"batches_rank{rank}.pt")
    return finish(self, tracker)


StudentBatches.draw = draw_and_keep
Run.finish = finish_and_dump
sys.exit(cli.main(sys.argv[1:]))
