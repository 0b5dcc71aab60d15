"""Test-only hook (not part of the command's interface): stop a merge at a known point so a test can signal or
kill a process that is known to be mid-write.

FUSED_LORA_MERGE_TEST_PAUSE=PATH: after the first tensor of the first shard is written and flushed, the merge
creates PATH (holding its pid) and sleeps up to PAUSE_SECONDS before going on. Later shards do not pause
(PATH exists by then). Unset, as always outside tests, it costs one environment lookup per shard.
"""

from __future__ import annotations

import os
import time
from typing import BinaryIO

PAUSE_ENV = "FUSED_LORA_MERGE_TEST_PAUSE"
PAUSE_SECONDS = 60.0


def pause_after_first_tensor(dst: BinaryIO) -> None:
    marker = os.environ.get(PAUSE_ENV)
    if not marker or os.path.exists(marker):
        return
    dst.flush()
    with open(marker + ".part", "w", encoding="utf-8") as f:
        f.write(str(os.getpid()))
    os.rename(marker + ".part", marker)  # appears whole: the test may read it as soon as it exists
    time.sleep(PAUSE_SECONDS)
