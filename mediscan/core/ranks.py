"""Where this process stands among ``torchrun``'s processes: shared by distributed training and by
sharded archive inference (which may not import each other)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessRank:
    """Rank, world size and local rank of this process (a plain run: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes shared files."""
        return self.rank == 0
