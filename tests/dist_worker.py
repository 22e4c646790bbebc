"""One torchrun process of tests/test_distributed.py: the real `dfkd run`, and on the way out each
rank saves its own student weights and latent generator state (rank 0 alone writes the run)."""
import os
import sys
from pathlib import Path

import torch

from dfkd import cli
from dfkd.trainer import Trainer

dump = Path(os.environ["DFKD_TEST_DUMP"])
finish = Trainer.finish


def finish_and_dump(self, tracker):
    rank = os.environ["RANK"]
    torch.save({k: v.clone() for k, v in self.student.state_dict().items()}, dump / f"student_rank{rank}.pt")
    torch.save(self.latent_rng.get_state(), dump / f"latent_rank{rank}.pt")
    return finish(self, tracker)


Trainer.finish = finish_and_dump
sys.exit(cli.main(sys.argv[1:]))
