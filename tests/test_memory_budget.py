"""The memory budget: admission in order, bounded waits, refusals a client can act on, and the
memory limit it is sized from."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from embedserve.server.config import MemoryBudgetSetting
from embedserve.server.core import LimitExceeded, Overloaded
from embedserve.server.core.memory_budget import MEMORY_BUDGET_REASON, MemoryBudget, memory_limit_bytes


async def test_requests_within_the_budget_go_on_at_once() -> None:
    seen: list[int] = []
    budget = MemoryBudget(100, wait_seconds=1, on_change=lambda changed: seen.append(changed.in_use_bytes))
    first = await budget.reserve(60, "first")
    second = await budget.reserve(40, "second")
    assert budget.in_use_bytes == 100
    first.release()
    first.release()  # a second release gives nothing back twice
    second.shrink(10)
    assert budget.in_use_bytes == 10
    second.shrink(30)  # never grows
    async with second:
        pass
    assert budget.in_use_bytes == 0
    assert seen == [60, 100, 40, 10, 0]
    assert budget.peak_bytes == 100


async def test_waiters_are_admitted_in_order_as_room_comes_back() -> None:
    budget = MemoryBudget(100, wait_seconds=5)
    held = await budget.reserve(90, "held")
    order: list[str] = []

    async def take(name: str, nbytes: int) -> None:
        reservation = await budget.reserve(nbytes, name)
        order.append(name)
        reservation.release()

    large = asyncio.create_task(take("large", 80))
    await asyncio.sleep(0)
    small = asyncio.create_task(take("small", 5))  # would fit now, but waits behind the large one
    await asyncio.sleep(0.05)
    assert order == []
    assert budget.waiting == 2
    held.release()
    await asyncio.gather(large, small)
    assert order == ["large", "small"]
    assert budget.in_use_bytes == 0


async def test_a_request_that_waits_too_long_is_refused_with_a_retry_hint() -> None:
    budget = MemoryBudget(100, wait_seconds=0.2)
    held = await budget.reserve(100, "held")
    with pytest.raises(Overloaded) as refused:
        await budget.reserve(1, "Tokenize")
    error = refused.value
    assert error.reason == MEMORY_BUDGET_REASON
    assert error.retry_after is not None
    assert error.retry_after >= 0.2
    assert error.metadata == {"budget_bytes": "100", "in_use_bytes": "100", "requested_bytes": "1"}
    assert "Tokenize" in str(error)
    assert budget.waiting == 0
    assert budget.refused == 1
    held.release()
    assert budget.in_use_bytes == 0


async def test_a_request_larger_than_the_budget_can_never_run() -> None:
    budget = MemoryBudget(100, wait_seconds=5)
    with pytest.raises(LimitExceeded) as refused:
        await budget.reserve(101, "Tokenize")
    assert refused.value.limit == "memory_budget"
    assert refused.value.allowed == 100
    assert refused.value.requested == 101


async def test_a_cancelled_waiter_takes_nothing_and_lets_others_in() -> None:
    budget = MemoryBudget(100, wait_seconds=5)
    held = await budget.reserve(60, "held")
    blocked = asyncio.create_task(budget.reserve(50, "blocked"))
    await asyncio.sleep(0.01)
    behind = asyncio.create_task(budget.reserve(40, "behind"))
    await asyncio.sleep(0.01)
    assert not behind.done()  # behind the first waiter
    blocked.cancel()
    admitted = await asyncio.wait_for(behind, 1)
    assert budget.in_use_bytes == 100
    admitted.release()
    held.release()
    assert budget.in_use_bytes == 0
    assert budget.waiting == 0


async def test_many_concurrent_requests_never_exceed_the_budget() -> None:
    budget = MemoryBudget(1000, wait_seconds=10)
    highest = 0

    async def work(nbytes: int) -> None:
        nonlocal highest
        async with await budget.reserve(nbytes, "work"):
            highest = max(highest, budget.in_use_bytes)
            await asyncio.sleep(0.001 * (nbytes % 7))

    await asyncio.gather(*(work(37 * i % 700 + 1) for i in range(300)))
    assert highest <= 1000
    assert budget.in_use_bytes == 0


def _limits(root: Path, lines: str, files: dict[str, str]) -> int:
    (root / "fs").mkdir(parents=True)
    (root / "cgroup").write_text(lines)
    for name, value in files.items():
        (root / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "fs" / name).write_text(value)
    (root / "meminfo").write_text("MemTotal:       16384000 kB\nMemFree: 1 kB\n")
    return memory_limit_bytes(root / "cgroup", root / "fs", root / "meminfo")


def test_the_memory_limit_is_the_lowest_of_the_cgroups_and_the_machine(tmp_path: Path) -> None:
    machine = 16384000 * 1024
    assert _limits(tmp_path / "none", "0::/\n", {}) == machine
    assert _limits(
        tmp_path / "v2", "0::/pod/app\n", {"memory.max": "max", "pod/app/memory.max": "2147483648"}
    ) == (2 << 30)
    # A parent's limit binds its children.
    v2_parent = {"pod/memory.max": "1073741824", "pod/app/memory.max": "max"}
    assert _limits(tmp_path / "v2p", "0::/pod/app\n", v2_parent) == 1 << 30
    v1 = {
        "memory/job/memory.limit_in_bytes": "3221225472",
        "memory/memory.limit_in_bytes": "9223372036854771712",
    }
    assert _limits(tmp_path / "v1", "4:memory:/job\n3:cpu:/\n", v1) == 3 << 30
    # A container sees its own cgroup as the root, whatever path /proc says.
    inside = {"memory.max": "536870912"}
    assert _limits(tmp_path / "ns", "0::/../../kubepods/pod1\n", inside) == 512 << 20


@pytest.mark.parametrize(
    ("text", "limit", "workers", "expected"),
    [
        ("auto", 8 << 30, 1, 4 << 30),
        ("auto", 8 << 30, 2, 2 << 30),
        ("25%", 8 << 30, 1, 2 << 30),
        ("512MiB", 8 << 30, 4, 512 << 20),
        ("1.5 GiB", 8 << 30, 1, 3 << 29),
        ("2g", 8 << 30, 1, 2_000_000_000),
        ("1000000", 8 << 30, 1, 1_000_000),
    ],
)
def test_budget_settings(text: str, limit: int, workers: int, expected: int) -> None:
    assert MemoryBudgetSetting.parse(text).bytes_of(limit, workers) == expected


@pytest.mark.parametrize("text", ["", "x", "0", "-1GiB", "150%", "0%", "4 parsecs"])
def test_bad_budget_settings_say_why(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a size|percentage"):
        MemoryBudgetSetting.parse(text)
