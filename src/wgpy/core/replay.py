"""The receive-side replay window: 8192 bits kept, 8128 usable (as Linux and wireguard-go).

The bitmap is a ring of 128 words of 64 bits. Bit `n % 8192` records counter n - 1 (the
counter is shifted by one so that a fresh window, with `top == 0`, accepts counter 0).
When a newer counter arrives, the words between the old and the new top are cleared; the
last word may be partly stale, which is why only 8192 - 64 counters behind the top count.
"""

from __future__ import annotations

from wgpy.core.constants import REJECT_AFTER_MESSAGES

WORD_BITS = 64
WORDS = 128
WINDOW = WORDS * WORD_BITS - WORD_BITS  # 8128


class ReplayWindow:
    __slots__ = ("top", "words")

    def __init__(self) -> None:
        self.top = 0  # highest counter seen, plus one
        self.words = [0] * WORDS

    def reset(self) -> None:
        self.top = 0
        self.words = [0] * WORDS

    def accept(self, counter: int) -> bool:
        """True (and remembered) if `counter` is new and recent; call after the tag verified."""
        if counter >= REJECT_AFTER_MESSAGES or self.top > REJECT_AFTER_MESSAGES:
            return False
        counter += 1
        top = self.top
        if counter + WINDOW < top:
            return False
        words = self.words
        index = counter >> 6
        if counter > top:
            current = top >> 6
            for i in range(current + 1, current + 1 + min(index - current, WORDS)):
                words[i & (WORDS - 1)] = 0
            self.top = counter
        index &= WORDS - 1
        bit = 1 << (counter & (WORD_BITS - 1))
        if words[index] & bit:
            return False
        words[index] |= bit
        return True
