"""A reward for timing runs with random-weight models: deterministic, graded, so groups
have non-zero advantages and every phase of a step does its work (not a real verifier)."""

import zlib


def hashed_reward(response: str, answer: str) -> float:
    """A value in {0, 0.25, ..., 1} from a hash of the response text."""
    return (zlib.crc32(response.encode()) % 5) / 4
