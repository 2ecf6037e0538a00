"""The node shard's usage read in parts: the id ranges cover every allocation id exactly once."""
from __future__ import annotations

import uuid

from actors.node_shard import USAGE_READ_RANGES


def test_the_ranges_partition_the_uuid_space_in_order():
    assert USAGE_READ_RANGES[0][0] == "00000000-0000-0000-0000-000000000000"
    assert USAGE_READ_RANGES[-1][1] == "ffffffff-ffff-ffff-ffff-ffffffffffff"
    for (_, hi), (lo, _) in zip(USAGE_READ_RANGES, USAGE_READ_RANGES[1:]):
        # Adjacent: the next range starts right after this one ends (uuids compare as their bytes).
        assert uuid.UUID(lo).int == uuid.UUID(hi).int + 1


def test_every_id_falls_in_exactly_one_range():
    for aid in [str(uuid.uuid4()) for _ in range(2000)] + ["00000000-0000-0000-0000-000000000000",
                                                            "ffffffff-ffff-ffff-ffff-ffffffffffff"]:
        assert sum(lo <= aid <= hi for lo, hi in USAGE_READ_RANGES) == 1
