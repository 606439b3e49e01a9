"""What a branch grid spends: the examples its branches and base runs train, against a full grid.

A CBS(t) curve from branches (docs/branches.md) should cost a fraction of the grid it replaces: the same
batch sizes (k x B for every multiplier k), each trained for the base's whole budget at every seed the
branches use. ``critbatch cells`` and ``critbatch render`` print the comparison under the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..cell.spec import Cell, total_steps


@dataclass
class BranchCost:
    branches: int = 0
    bases: int = 0
    branch_examples: int = 0
    base_examples: int | None = 0  # None: a base's training-set size is known only to its data
    grid_examples: int | None = 0
    batch_sizes: set[int] = field(default_factory=set)
    seeds: set[int] = field(default_factory=set)

    def text(self) -> str:
        head = f"branches: {self.branches} cells from {self.bases} base run(s) train {self.branch_examples:,} examples"
        if self.base_examples is None or self.grid_examples is None:
            return (head + "; the base runs' budget and a full grid's are not counted (the training-set size is "
                    "known only once the data is loaded)")
        spent = self.branch_examples + self.base_examples
        grid = (f"a full grid of the same {len(self.batch_sizes)} batch sizes x {len(self.seeds)} seed(s), "
                f"each for the base's budget, would train {self.grid_examples:,}")
        return (f"{head}, the base runs {self.base_examples:,}: {spent:,} in all, {_share(spent, self.grid_examples)} "
                f"of what {grid} (the branches alone {_share(self.branch_examples, self.grid_examples)})")


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "-"


def _examples(cell: Cell, train_size: int) -> int:
    """Examples the cell trains in its budget: its steps times its batch."""
    return total_steps(cell, max(1, train_size // cell.batch_size)) * cell.batch_size


def branch_cost(cells: list[Cell]) -> BranchCost | None:
    """The cost of the grid's branch cells, or None when it has none. Each base counts once with its own
    budget; the full grid holds each base's problem at every batch size k x B and branch seed once."""
    branches = [c for c in cells if c.branch is not None]
    if not branches:
        return None
    cost = BranchCost(branches=len(branches))
    bases = {c.branch.base: c.base_cell() for c in branches}
    cost.bases = len(bases)
    cost.branch_examples = sum(total_steps(c, 1) * c.batch_size for c in branches)  # its length, in steps
    cost.batch_sizes = {c.batch_size for c in branches}
    cost.seeds = {c.branch.seed for c in branches}
    sizes = {base_id: base.train_size() for base_id, base in bases.items()}
    if None in sizes.values():
        cost.base_examples = cost.grid_examples = None
        return cost
    cost.base_examples = sum(_examples(base, sizes[base_id]) for base_id, base in bases.items())
    points = {(c.branch.base, c.batch_size, c.branch.seed) for c in branches}
    cost.grid_examples = sum(_examples(bases[base_id].model_copy(update={"batch_size": batch}), sizes[base_id])
                             for base_id, batch, _ in points)
    return cost
