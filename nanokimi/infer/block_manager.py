"""Cache bookkeeping on the host: the block pool (reference counts, prefix hashes, LRU of free cached
blocks) and the KDA state slots (one per running sequence, plus snapshots of states at cached prefixes).

Block 0 is never handed out: padded rows of a batch write there. A full block that a sequence has
computed is registered under the hash of its whole prefix, `h_i = H(h_{i-1}, tokens of block i)`
(blake2b, so equal hashes mean equal prefixes); when its last user lets go it joins the free list but
keeps its content and hash until it is handed out again (least recently freed first), so a later
request with the same prefix can take it back.
"""
import hashlib
from array import array
from collections import OrderedDict


def block_hash(parent: bytes | None, tokens) -> bytes:
    """The chained hash of a full block: it names the block's tokens and every token before them."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"the cache needs at least 2 blocks (one is reserved), got {num_blocks}; "
                             "raise max_cache_tokens.")
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.hash_of: dict[int, bytes] = {}
        self.cached: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    def allocate(self) -> int:
        """A free block with one reference; the least recently freed goes first (its cached content is lost)."""
        block, _ = self.free.popitem(last=False)
        old = self.hash_of.pop(block, None)
        if old is not None:
            del self.cached[old]
        self.ref[block] = 1
        return block

    def take(self, block: int) -> None:
        """One more reference to a cached block (a prefix hit)."""
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; the last blocks of a sequence are freed first, so they are
        evicted before its prefix."""
        for block in reversed(blocks):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None

    def register(self, block: int, h: bytes) -> None:
        if h not in self.cached and block not in self.hash_of:
            self.cached[h] = block
            self.hash_of[block] = h

    def lookup(self, h: bytes) -> int | None:
        return self.cached.get(h)

    def forget_hashes(self) -> None:
        """No block is a prefix-cache hit any more (blocks in use stay with their sequences)."""
        self.cached.clear()
        self.hash_of.clear()


class StateSlots:
    """KDA state slots: running sequences take one each; free slots hold snapshots keyed by block hash
    (the state right after that block), evicted least recently used when a slot is needed."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.dummy = num_slots  # padded rows of a batch use the extra slot after the real ones
        self.free = list(range(num_slots - 1, -1, -1))
        self.snapshots: OrderedDict[bytes, int] = OrderedDict()

    def _free_one(self) -> int | None:
        if self.free:
            return self.free.pop()
        if self.snapshots:
            return self.snapshots.popitem(last=False)[1]
        return None

    def allocate(self) -> int | None:
        return self._free_one()

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def snapshot_slot(self, h: bytes) -> int | None:
        """The slot holding the state after block h, marked recently used; None if there is none."""
        slot = self.snapshots.get(h)
        if slot is not None:
            self.snapshots.move_to_end(h)
        return slot

    def drop_snapshots(self) -> None:
        self.free.extend(self.snapshots.values())
        self.snapshots.clear()

    def new_snapshot(self, h: bytes) -> int | None:
        """A slot to copy the state after block h into (None: no room, or it exists already)."""
        if h in self.snapshots:
            self.snapshots.move_to_end(h)
            return None
        slot = self._free_one()
        if slot is not None:
            self.snapshots[h] = slot
        return slot
